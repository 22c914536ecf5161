import pytest
import torch
from conftest import tiny_pixart, tiny_unet
from diffusers import DiTTransformer2DModel, UNet2DModel

from effdiff.adapters import UnsupportedBackboneError, adapter_for


def test_unet_view():
    adapter = adapter_for(tiny_unet())
    blocks = adapter.blocks()
    assert adapter.kind == "unet"
    assert [b.role for b in blocks] == ["down", "down", "mid", "up", "up"]
    assert adapter.skips() == [(0, 4), (1, 3)]
    assert adapter.attention() and all(hasattr(m, "to_q") for _, m in adapter.attention())
    assert all(isinstance(m, torch.nn.Linear) for _, m in adapter.linears())


def test_each_unet_blocks_output_layer_produces_the_channels_the_block_returns():
    """A channel-pruned block's output is matched to the teacher's kept channels of this layer: the layer must be
    the one whose output the block returns (same width, same values for the last one of a stage)."""
    model = tiny_unet()
    adapter = adapter_for(model)
    outputs, layers = {}, {}
    hooks = [ref.module.register_forward_hook(lambda _m, _a, out, ref=ref: outputs.__setitem__(ref.name,
                                                                                            ref.hidden_out(out)))
             for ref in adapter.blocks()]
    for ref in adapter.blocks():
        name = adapter.block_output_layer(ref)
        hooks.append(model.get_submodule(name).register_forward_hook(
            lambda _m, _a, out, ref=ref: layers.__setitem__(ref.name, out)))
    with torch.no_grad():
        model(**adapter.example_call(1))
    for hook in hooks:
        hook.remove()
    assert set(outputs) == set(layers) == {ref.name for ref in adapter.blocks()}
    resampled = [ref.name for ref in adapter.blocks() if "samplers" in adapter.block_output_layer(ref)]
    assert resampled  # a resampler's convolution is the block's output itself
    for name, out in outputs.items():
        assert layers[name].shape == out.shape, name
        assert torch.equal(layers[name], out) or name not in resampled, name
    assert adapter_for(tiny_pixart()).block_output_layer(adapter_for(tiny_pixart()).blocks()[0]) is None


def test_dit_views():
    pix = adapter_for(tiny_pixart())
    assert pix.kind == "dit" and len(pix.blocks()) == 2 and pix.skips() == []
    assert {b.pattern for b in pix.blocks()} == {"hidden"}
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=1,
                                out_channels=1, num_layers=3, sample_size=8, patch_size=2,
                                norm_num_groups=4)
    assert type(adapter_for(dit)).__name__ == "DiTAdapter" and len(adapter_for(dit).blocks()) == 3


def test_unet2d_adapter():
    model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                        layers_per_block=1, norm_num_groups=4,
                        down_block_types=("DownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "UpBlock2D"))
    assert type(adapter_for(model)).__name__ == "UNet2DAdapter"


def test_block_replace_wraps_and_restores():
    model = tiny_pixart()
    ref = adapter_for(model).blocks()[1]
    calls = []

    class Wrap(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            calls.append(1)
            return self.inner(*args, **kwargs)

    old = ref.replace(Wrap(ref.module))
    x = torch.randn(1, 1, 8, 8)
    kw = dict(encoder_hidden_states=torch.randn(1, 4, 16), timestep=torch.tensor([5]),
              added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    wrapped = model(x, **kw).sample
    assert calls == [1]
    ref.replace(old)
    assert torch.equal(wrapped, model(x, **kw).sample) and model.transformer_blocks[1] is old


def test_unsupported():
    with pytest.raises(UnsupportedBackboneError, match="supported: .*PixArtTransformer2DModel"):
        adapter_for(torch.nn.Conv2d(1, 1, 1))
    with pytest.raises(UnsupportedBackboneError, match="no denoiser"):
        adapter_for(object())


def test_bksdm_block_removal_keeps_the_unet_running_at_every_variant_and_refuses_what_it_cannot_remove():
    """SD 1.5's layout in miniature: base halves each stage's pairs (up stages keep their first and last), small
    also drops the mid-block, tiny also the innermost stage; each runs, smaller each time, and undoes exactly."""
    from _teacher import tiny_teacher

    from effdiff.compress.structure import apply_block_plan
    from effdiff.patches import PatchLog

    unet = tiny_teacher("sd-stages").denoiser
    adapter = adapter_for(unet)
    call = adapter.example_call(2)
    with torch.no_grad():
        before = unet(**call).sample
    sizes = [sum(p.numel() for p in unet.parameters())]
    for variant in ("base", "small", "tiny"):
        plan = adapter.block_removal(variant)
        log = PatchLog()
        apply_block_plan(log, unet, plan)
        with torch.no_grad():
            assert unet(**call).sample.shape == before.shape
        sizes.append(sum(p.numel() for p in unet.parameters()))
        assert [len(b.resnets) for b in unet.down_blocks][:2] == [1, 1]
        assert all(len(b.resnets) == 2 for b in unet.up_blocks)
        for teacher_name, student_name in plan.features:
            assert unet.get_submodule(student_name) is not None and teacher_name.split(".")[0] in ("down_blocks",
                                                                                                 "up_blocks")
        log.restore()
        with torch.no_grad():
            assert torch.equal(unet(**call).sample, before)
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 4
    with pytest.raises(ValueError, match="base, small or tiny"):
        adapter.block_removal("huge")
    narrow = adapter_for(tiny_teacher("sd").denoiser)  # stages of 8 and 16 channels, one pair each
    with pytest.raises(ValueError, match="one pair per down stage already"):
        narrow.block_removal("base")
    with pytest.raises(ValueError, match=r"needs a stage above it of the same width.*\[8, 16\]"):
        narrow.block_removal("tiny")
