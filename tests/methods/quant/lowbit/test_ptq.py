import pytest
import torch
from conftest import assert_deterministic_calibration, denoiser, make_tiny_dit, make_tiny_sd, no_patches, sample

import effdiff
from effdiff import RecipeError
from effdiff.api import is_accelerated
from effdiff.methods.quant.lowbit.base import forget_calibrations
from effdiff.methods.quant.lowbit.packed import model_bytes

STEPS = 4
FAST = "prompts=2,steps=4"  # one small calibration call


pytestmark = pytest.mark.usefixtures("fresh_quant_memo")




def test_nothing_quantized_is_bit_identical(tiny_pipe):
    baseline = sample(tiny_pipe, steps=STEPS)
    effdiff.accelerate(tiny_pipe, f"ptq:wbits=32,abits=32,{FAST}")
    method = tiny_pipe.effdiff.methods[0]
    assert method.layers and torch.equal(sample(tiny_pipe, steps=STEPS), baseline)


@pytest.mark.parametrize("recipe", [
    "ptq:wbits=4,abits=8", "ptq:wbits=4,abits=16,range=percentile", "qdiffusion:wbits=4,abits=8,iters=20",
    "qdiffusion:wbits=8,abits=8,iters=0,split=false",
])
def test_quantizes_then_remove_restores_bit_for_bit(tiny_pipe, recipe):
    baseline = sample(tiny_pipe, steps=STEPS)
    state = {k: v.clone() for k, v in denoiser(tiny_pipe).state_dict().items()}
    effdiff.accelerate(tiny_pipe, f"{recipe},{FAST}")
    quantized = sample(tiny_pipe, steps=STEPS)
    assert torch.isfinite(quantized).all() and not torch.equal(quantized, baseline)
    assert (quantized - baseline).abs().mean() < 0.2  # quantized, not broken
    described = tiny_pipe.effdiff.describe()
    assert "simulated" in described and "trained" in described
    tiny_pipe.effdiff.remove()
    assert no_patches(tiny_pipe)
    assert all(torch.equal(v, state[k]) for k, v in denoiser(tiny_pipe).state_dict().items())
    assert torch.equal(sample(tiny_pipe, steps=STEPS), baseline)


def test_lower_bits_mean_larger_error(tiny_sd):
    baseline = sample(tiny_sd, steps=STEPS)
    errors = []
    for wbits in (8, 4, 2):
        effdiff.accelerate(tiny_sd, f"ptq:wbits={wbits},abits=32,{FAST}")
        errors.append(float((sample(tiny_sd, steps=STEPS) - baseline).pow(2).mean()))
        tiny_sd.effdiff.remove()
    assert errors[0] < errors[1] < errors[2]


@pytest.mark.parametrize("recipe", ["ptq:wbits=4,abits=8,range=percentile", "qdiffusion:wbits=4,abits=8,iters=20"])
def test_calibration_is_deterministic(recipe):
    assert_deterministic_calibration(make_tiny_sd, f"{recipe},{FAST}", steps=STEPS)


@pytest.mark.parametrize("recipe", ["ptq:wbits=4,abits=8", "qdiffusion:wbits=4,abits=8,iters=20"])
def test_save_and_reload_give_identical_outputs(tiny_pipe, recipe, tmp_path):
    path = tmp_path / "cal.safetensors"
    effdiff.accelerate(tiny_pipe, f"{recipe},{FAST}")
    quantized = sample(tiny_pipe, steps=STEPS)
    tiny_pipe.effdiff.methods[0].save(str(path))
    tiny_pipe.effdiff.remove()
    forget_calibrations()
    effdiff.accelerate(tiny_pipe, f"{recipe},{FAST},calibration={path}")
    assert torch.equal(sample(tiny_pipe, steps=STEPS), quantized)
    tiny_pipe.effdiff.remove()
    with pytest.raises(RecipeError, match="calibrated with"):
        effdiff.accelerate(tiny_pipe, f"{recipe.replace('abits=8', 'abits=16')},{FAST},calibration={path}")
    other = make_tiny_dit() if hasattr(tiny_pipe, "unet") else make_tiny_sd()
    with pytest.raises(RecipeError, match="other weights"):
        effdiff.accelerate(other, f"{recipe},{FAST},calibration={path}")
    with pytest.raises(RecipeError, match="no saved quantized model"):
        effdiff.accelerate(tiny_pipe, f"{recipe},{FAST},calibration={tmp_path / 'missing.safetensors'}")


def test_packed_size_counts_codes_and_grids(tiny_sd):
    effdiff.accelerate(tiny_sd, f"ptq:wbits=4,abits=8,{FAST}")
    method = tiny_sd.effdiff.methods[0]
    modules = dict(tiny_sd.unet.named_modules())
    for name, record in method.layers.items():
        weight = modules[name].weight
        assert record.codes.numel() == -(-weight.numel() // 2)  # two 4-bit codes per byte
        assert record.scale.shape == (weight.shape[0], 1)
    size = model_bytes(tiny_sd.unet, method.layers)
    assert size == method.size() and size["bytes"] < 0.5 * size["fp32_bytes"]


def test_qdiffusion_splits_unet_skip_concats_and_adaround_helps(tiny_sd, tiny_dit):
    effdiff.accelerate(tiny_sd, f"qdiffusion:wbits=4,abits=8,iters=50,{FAST}")
    method = tiny_sd.effdiff.methods[0]
    split = method.info["split_layers"]
    assert split and all(n.startswith("up_blocks.") and n.endswith(("conv1", "conv_shortcut")) for n in split)
    for name in split:
        record = method.layers[name]
        assert len(record.segments) == 3 and record.act_segments == record.segments
    assert method.info["adaround_error_ratio_mean"] < 1.0
    assert {"conv_in", "conv_out"} == set(method.info["kept_float"])
    effdiff.accelerate(tiny_dit, f"qdiffusion:wbits=4,abits=8,iters=0,{FAST}")
    assert tiny_dit.effdiff.methods[0].info["split_layers"] == []


def test_composes_with_solver_and_deepcache(tiny_sd):
    pytest.importorskip("effdiff.methods.cache.deepcache")
    baseline = sample(tiny_sd, steps=STEPS)
    effdiff.accelerate(tiny_sd, f"deepcache:interval=2+ptq:wbits=4,abits=8,{FAST}+dpmpp2m:steps=4")
    names = [m.name for m in tiny_sd.effdiff.methods]
    assert names == ["dpmpp2m", "ptq", "deepcache"]
    out = sample(tiny_sd, steps=STEPS)
    assert torch.isfinite(out).all() and tiny_sd.effdiff.methods[2].stats.cached > 0
    tiny_sd.effdiff.remove()
    assert no_patches(tiny_sd) and torch.equal(sample(tiny_sd, steps=STEPS), baseline)


def test_stacking_reuses_the_calibration(tiny_sd):
    effdiff.accelerate(tiny_sd, f"qdiffusion:wbits=4,abits=8,iters=5,{FAST}")
    first = tiny_sd.effdiff.methods[0].layers
    effdiff.accelerate(tiny_sd, "deepcache:interval=2")  # stacking re-applies the quantizer
    assert tiny_sd.effdiff.methods[0].layers is first


@pytest.mark.parametrize(("recipe", "message"), [
    ("ptq:wbits=9", "one of 2, 3, 4"),
    ("ptq:abits=1", "one of 2, 3, 4"),
    ("qdiffusion:wbits=12", "one of 2, 3, 4"),
    ("ptq:range=kl", "one of minmax, percentile"),
    ("ptq+qdiffusion", "both take over the weights"),
])
def test_bad_settings_refused(tiny_sd, recipe, message):
    with pytest.raises(RecipeError, match=message):
        effdiff.accelerate(tiny_sd, recipe)
    assert not is_accelerated(tiny_sd)


@pytest.mark.parametrize("name", ["sd", "dit", "flux"])  # stock PixArt at 16 px fails its own resolution binning
def test_stock_pipelines_calibrate_quantize_and_restore(name):
    import _stock

    pipe = _stock.build(name)
    baseline = _stock.generate(name, pipe, 2)
    effdiff.accelerate(pipe, "ptq:wbits=4,abits=8,prompts=2,steps=2")
    method = pipe.effdiff.methods[0]
    assert len(method.layers) > 4
    out = _stock.generate(name, pipe, 2)
    assert torch.isfinite(out).all() and not torch.equal(out, baseline)
    pipe.effdiff.remove()
    assert torch.equal(_stock.generate(name, pipe, 2), baseline)
