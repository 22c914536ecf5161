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
