import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from conftest import denoiser as model_of
from conftest import make_tiny_sd, sample
from torch import nn

import effdiff
from effdiff import RecipeError
from effdiff.methods.quant.native import kernels, select
from effdiff.methods.quant.native.kernels import (
    Int8DynamicConv2d,
    Int8DynamicLinear,
    WeightOnlyConv2d,
    WeightOnlyLinear,
    quantize_weight,
)

STEPS = 3
needs_fbgemm = pytest.mark.skipif(not kernels.int8_engine_available(), reason="no fbgemm engine in this torch")


# ---------------------------------------------------------------- the weight quantizer


@pytest.mark.parametrize(("bits", "group"), [(8, None), (4, None), (4, 16), (8, 32)])
def test_round_trip_error_is_at_most_half_a_step(bits, group):
    torch.manual_seed(0)
    w = torch.randn(24, 64) * torch.logspace(-3, 1, 24)[:, None]  # channels of very different ranges
    w[3] = 0.0
    q = quantize_weight(w, bits, group)
    assert q.codes.dtype == torch.int8 and q.codes.abs().max() <= kernels.qmax(bits)
    step = q.scale if group is None else q.scale.repeat_interleave(group, dim=1)
    error = (q.dequantize() - w).abs()
    assert (error <= step / 2 + 1e-7 * w.abs()).all()
    assert torch.equal(q.dequantize()[3], torch.zeros(64))
    assert (error.amax(1) > 0).sum() > 12  # it really rounds


def test_conv_weights_scale_per_output_channel():
    w = torch.randn(8, 4, 3, 3)
    q = quantize_weight(w, 8)
    assert q.scale.shape == (8, 1, 1, 1)
    assert torch.allclose(q.scale.flatten(), w.abs().amax((1, 2, 3)) / 127)


def test_bad_quantizer_arguments_refused():
    with pytest.raises(ValueError, match="bits"):
        quantize_weight(torch.randn(4, 4), 3)
    with pytest.raises(ValueError, match="group"):
        quantize_weight(torch.randn(4, 10), 4, 4)


# ---------------------------------------------------------------- the int8 layers


@needs_fbgemm
def test_dynamic_int8_layers_match_float_within_quantization_error():
    torch.manual_seed(0)
    linear, conv = nn.Linear(64, 48), nn.Conv2d(16, 24, 3, padding=1, stride=2)
    # after a SiLU: a zero point far from the middle (fbgemm's own dynamic conv gets these wrong by ~50 %)
    x, image = F.silu(torch.randn(2, 7, 64) * 2), F.silu(torch.randn(2, 16, 9, 9) * 2)
    q_linear, q_conv = Int8DynamicLinear.from_float(linear), Int8DynamicConv2d.from_float(conv)
    with torch.no_grad():
        for q, f, inp in ((q_linear, linear, x), (q_conv, conv, image)):
            out, ref = q(inp), f(inp)
            assert out.shape == ref.shape and out.dtype == torch.float32
            assert (out - ref).norm() < 0.04 * ref.norm()
    weight_only = WeightOnlyLinear.from_float(linear, 4, 16)
    assert weight_only.codes.dtype == torch.uint8 and weight_only.codes.numel() == linear.weight.numel() // 2


def test_uint8_activation_codes_hold_zero_and_the_range():
    x = torch.tensor([[-0.5, 0.0, 1.0, 3.0]])
    codes, scale, zero = kernels.quantize_uint8(x)
    assert codes.dtype == torch.uint8 and codes.min() == 0 and codes.max() == 255
    assert torch.allclose((codes.float() - zero) * scale, x, atol=float(scale) / 2 + 1e-7)
    assert ((codes.float() - zero) * scale)[0, 1] == 0  # zero is exact: zero padding stays zero
    codes, scale, zero = kernels.quantize_uint8(torch.zeros(3))  # an all-zero input has a usable scale
    assert torch.isfinite(scale) and scale > 0 and (codes == zero).all()


@needs_fbgemm
def test_int8_conv_survives_copy_and_batch_changes():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1)
    q = Int8DynamicConv2d.from_float(conv)
    image = F.silu(torch.randn(3, 8, 6, 5) * 2)
    with torch.no_grad():
        out = q(image)
        assert out.shape == (3, 12, 6, 5) and q(image[:1]).shape == (1, 12, 6, 5)
        clone = copy.deepcopy(q)  # oneDNN's packed weight is opaque: the copy repacks from the codes
        assert torch.equal(clone(image), out)
        assert torch.equal(pickle.loads(pickle.dumps(q))(image), out)


@needs_fbgemm
@pytest.mark.parametrize("vnni", [True, False])
def test_linear_is_accurate_with_and_without_reduce_range(monkeypatch, vnni):
    monkeypatch.setattr(kernels, "has_vnni", lambda: vnni)
    torch.manual_seed(0)
    linear = nn.Linear(128, 32)
    q = Int8DynamicLinear.from_float(linear)
    x = F.gelu(torch.randn(16, 128) * 3)
    with torch.no_grad():
        assert (q(x) - linear(x)).norm() < (0.04 if vnni else 0.06) * linear(x).norm()


@needs_fbgemm
@pytest.mark.parametrize(("vnni", "convs"), [(True, "auto"), (False, "auto"), (False, "true"), (True, "false")])
def test_convs_auto_follows_the_cpu(tiny_sd, monkeypatch, vnni, convs):
    from effdiff.methods.quant.native import int8

    monkeypatch.setattr(int8, "has_vnni", lambda: vnni)
    effdiff.accelerate(tiny_sd, f"int8:min_features=1,min_channels=1,convs={convs}")
    decisions = tiny_sd.effdiff.methods[0].decisions
    quantized_convs = any(d.quantize and d.layer.startswith("conv") for d in decisions)
    assert quantized_convs == (convs == "true" or (convs == "auto" and vnni))
    assert any(d.quantize and d.layer == "linear" for d in decisions)


def test_int4_conv_groups_a_padded_fan_in():
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 6, 3, padding=1)  # fan-in 45, padded to 64
    q = WeightOnlyConv2d.from_float(conv, 4, 32)
    assert q.codes.numel() == 6 * 64 // 2 and q.scale.shape == (6, 2)  # two int4 codes per byte
    weight = q.weight(torch.float32)
    assert weight.shape == conv.weight.shape
    step = q.scale.repeat_interleave(32, dim=1)[:, :45].reshape(conv.weight.shape)
    assert ((weight - conv.weight).abs() <= step / 2 + 1e-7).all()
    image = torch.randn(1, 5, 7, 7)
    with torch.no_grad():
        assert (q(image) - conv(image)).norm() < 0.2 * conv(image).norm()


def test_engine_refused_off_the_cpu():
    with pytest.raises(RecipeError, match="fbgemm CPU kernels"):
        kernels.require_int8_engine("int8", torch.device("cuda"))


# ---------------------------------------------------------------- the per-layer rule


def test_rule_names_a_reason_for_every_kept_layer(tiny_sd):
    decisions = {d.name: d for d in select.plan(tiny_sd.unet, min_features=32, min_channels=16)}
    assert not decisions["conv_in"].quantize and "first/last" in decisions["conv_in"].reason
    assert not decisions["conv_out"].quantize
    embedding = decisions["time_embedding.linear_1"]
    assert not embedding.quantize and "embedding" in embedding.reason
    narrow = decisions["down_blocks.0.resnets.0.conv1"]  # 8 channels
    assert not narrow.quantize and "narrower than 16" in narrow.reason
    assert decisions["down_blocks.1.resnets.0.conv2"].quantize  # 16 channels
    assert decisions["down_blocks.1.attentions.0.proj_in"].quantize  # a 16-channel 1x1 conv
    linear = decisions["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"]  # 16 features
    assert not linear.quantize and "narrower than 32" in linear.reason
    assert all(d.quantize for d in select.plan(tiny_sd.unet, 1, 1) if d.reason == "quantized")
    assert not any(d.layer.startswith("conv") and d.quantize for d in select.plan(tiny_sd.unet, 1, 1, convs=False))
    assert "layers quantized" in select.summarize(list(decisions.values()))


def test_rule_on_a_dit_keeps_embeddings_and_the_ends(tiny_dit):
    decisions = select.plan(tiny_dit.transformer, min_features=1, min_channels=1)
    kept = {d.name for d in decisions if not d.quantize}
    assert "pos_embed.proj" in kept and "proj_out" in kept
    assert any(name.startswith("adaln_single.") for name in kept)
    assert any(d.quantize and ".attn1.to_q" in d.name for d in decisions)


# ---------------------------------------------------------------- the methods


@needs_fbgemm
def test_nothing_selected_is_bit_identical(tiny_pipe):
    baseline = sample(tiny_pipe, steps=STEPS)
    effdiff.accelerate(tiny_pipe, "int8:min_features=65536,min_channels=65536")
    assert not any(d.quantize for d in tiny_pipe.effdiff.methods[0].decisions)
    assert torch.equal(sample(tiny_pipe, steps=STEPS), baseline)


@pytest.mark.parametrize("recipe", ["int8:min_features=1,min_channels=1,convs=true",
                                    "int8:min_features=1,min_channels=1,convs=false",
                                    "int8wo", "int4wo:group=32"])
def test_quantizes_then_remove_restores_bit_for_bit(tiny_pipe, recipe):
    if recipe.startswith("int8:") and not kernels.int8_engine_available():
        pytest.skip("no fbgemm engine")
    denoiser = model_of(tiny_pipe)
    modules = dict(denoiser.named_modules())
    baseline = sample(tiny_pipe, steps=STEPS)
    effdiff.accelerate(tiny_pipe, recipe)
    method = tiny_pipe.effdiff.methods[0]
    swapped = method.quantized_layers()
    assert swapped and all(not isinstance(m, (nn.Linear, nn.Conv2d)) for m in swapped.values())
    images = sample(tiny_pipe, steps=STEPS)
    assert torch.isfinite(images).all() and not torch.equal(images, baseline)
    tiny_pipe.effdiff.remove()
    assert all(m is modules[n] for n, m in denoiser.named_modules())
    assert torch.equal(sample(tiny_pipe, steps=STEPS), baseline)


@needs_fbgemm
@pytest.mark.parametrize("recipe", ["int8:min_features=1,min_channels=1,convs=true", "int4wo:group=32"])
def test_save_and_reload_gives_identical_outputs(tiny_pipe, tmp_path, recipe):
    name = recipe.partition(":")[0]
    path = tmp_path / "quantized.safetensors"
    effdiff.accelerate(tiny_pipe, recipe)
    quantized = sample(tiny_pipe, steps=STEPS)
    size = tiny_pipe.effdiff.methods[0].save(path)
    assert size == path.stat().st_size
    tiny_pipe.effdiff.remove()
    baseline = sample(tiny_pipe, steps=STEPS)
    denoiser = model_of(tiny_pipe)
    with torch.no_grad():  # another model of the same architecture: every tensor must come from the file
        for p in denoiser.parameters():
            p.add_(0.5)
    effdiff.accelerate(tiny_pipe, f"{name}:load={path}")
    assert torch.equal(sample(tiny_pipe, steps=STEPS), quantized)
    tiny_pipe.effdiff.remove()
    with torch.no_grad():
        for p in denoiser.parameters():
            p.sub_(0.5)
    assert (sample(tiny_pipe, steps=STEPS) - baseline).abs().max() < 1e-4


@needs_fbgemm
def test_saved_file_is_smaller_with_integer_codes(tmp_path):
    pipe = make_tiny_sd()
    fp32 = sum(t.numel() * t.element_size() for t in pipe.unet.state_dict().values())
    effdiff.accelerate(pipe, "int8:min_features=1,min_channels=1,convs=true")
    size = pipe.effdiff.methods[0].save(tmp_path / "q.safetensors")
    assert size < 0.6 * fp32


@needs_fbgemm
def test_load_refuses_foreign_files(tiny_sd, tiny_dit, tmp_path):
    path = tmp_path / "q.safetensors"
    effdiff.accelerate(tiny_sd, "int8:min_features=1,min_channels=1,convs=true")
    tiny_sd.effdiff.methods[0].save(path)
    tiny_sd.effdiff.remove()
    with pytest.raises(RecipeError, match="was saved by int8"):
        effdiff.accelerate(tiny_sd, f"int8wo:load={path}")
    with pytest.raises(RecipeError, match="does not have|does not match"):
        effdiff.accelerate(tiny_dit, f"int8:load={path}")
    assert all(not isinstance(m, Int8DynamicConv2d) for m in tiny_dit.transformer.modules())
    with pytest.raises(RecipeError, match="no saved quantized model"):
        effdiff.accelerate(tiny_sd, f"int8:load={tmp_path / 'missing.safetensors'}")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(RecipeError, match="not a readable"):
        effdiff.accelerate(tiny_sd, f"int8:load={tmp_path / 'junk.safetensors'}")


@needs_fbgemm
def test_composes_with_deepcache_and_a_solver(tiny_sd):
    baseline = sample(tiny_sd, steps=6)
    effdiff.accelerate(tiny_sd, "deepcache:interval=2+int8:min_features=1,min_channels=1,convs=true+dpmpp2m:steps=6")
    assert [m.name for m in tiny_sd.effdiff.methods] == ["dpmpp2m", "int8", "deepcache"]
    images = sample(tiny_sd, steps=6)
    assert torch.isfinite(images).all() and tiny_sd.effdiff.methods[-1].stats.cached > 0
    tiny_sd.effdiff.remove()
    assert torch.equal(sample(tiny_sd, steps=6), baseline)


@pytest.mark.parametrize(("recipe", "match"), [
    ("int8:min_features=0", "min_features"),
    ("int4wo:group=48", "group"),
    ("int8:convs=sometimes", "convs"),
    ("int8+int8wo", "weights"),
])
def test_bad_recipes_refused(tiny_sd, recipe, match):
    with pytest.raises(RecipeError, match=match):
        effdiff.accelerate(tiny_sd, recipe)


def test_int8_refused_on_a_device_it_does_not_run_on(tiny_sd):
    """CUDA takes torchao's int8 kernel (``auto``); effdiff's fbgemm kernels are refused there by name."""
    from effdiff.methods.quant.native import ao
    from effdiff.methods.quant.native.int8 import Int8
    from effdiff.recipe import build

    with pytest.raises(RecipeError, match="runs on cpu/cuda, not on mps"):
        build("int8", "unet", "mps")
    cuda = torch.device("cuda")
    if ao.available():
        assert Int8().resolve_backend(cuda) == "torchao"
    assert Int8(backend="effdiff").resolve_backend(cuda) == "effdiff"
    assert Int8().resolve_backend(torch.device("cpu")) == "effdiff"
    with pytest.raises(RecipeError, match="fbgemm CPU kernels; the denoiser is on cuda"):
        Int8(backend="effdiff").check_device(cuda)
