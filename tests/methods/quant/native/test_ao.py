"""torchao's kernels as a backend of the precision methods (``ao.py``), exercised on the CPU with torchao's int8
tensors (the only torchao kernels that run without a GPU): layers are measured on their real input during the
first call and kept float where they lose; ``select=rule`` quantizes every candidate; a saved plan reloads to the
same outputs without measuring; ``remove()`` gives the float model back bit for bit; and where torchao's kernel
cannot run (float8 and int4 off CUDA), the method is refused with the reason. The FP8/int4 speed-ups themselves
are measured by ``benchmarks/gpu_suite.py`` on a GPU (``fp8`` CUDA tests below are skipped without one)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_sd, sample
from torch import nn

import effdiff
from effdiff import RecipeError

ao = pytest.importorskip("effdiff.methods.quant.native.ao")
pytest.importorskip("torchao")
needs_fp8_gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                                   reason="float8 matmuls need a CUDA GPU of compute capability >= 8.9")
STEPS = 2


def test_a_layer_is_measured_on_its_recorded_input_and_kept_where_it_loses():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).eval()
    x = torch.randn(8, 64)
    inputs = ao.record_inputs(model, ["0", "2"], lambda: model(x))
    assert torch.equal(inputs["0"], x) and inputs["2"].shape == (8, 256)
    settings = ao.config("int8")
    every, kept, measured = ao.measured_plan(model, ["0", "2"], settings, lambda: model(x), 0.0, 1.0, reps=3)
    assert set(every) == {"0", "2"} and not kept and [m.name for m in measured] == ["0", "2"]
    assert all(0 < m.error < 0.05 and m.speedup > 0 for m in measured)
    none, kept, _ = ao.measured_plan(model, ["0", "2"], settings, lambda: model(x), float("inf"), 1.0, reps=3)
    assert not none and set(kept.values()) == {"measured under infx"}
    exact, kept, _ = ao.measured_plan(model, ["0", "2"], settings, lambda: model(x), 0.0, 0.0, reps=3)
    assert not exact and set(kept.values()) == {"relative error over 0"}
    assert isinstance(model[0].weight, nn.Parameter) and type(model[0].weight.data) is torch.Tensor  # untouched


@pytest.mark.parametrize("recipe", ["int8:backend=torchao,select=rule,min_features=1",
                                    "int8:backend=torchao,min_speedup=0,min_features=1",
                                    "int8wo:backend=torchao,select=rule,min_features=1"])
def test_torchao_layers_run_save_as_a_plan_reload_and_remove_bit_identically(recipe, tmp_path):
    pipe = make_tiny_sd()
    baseline = sample(pipe, steps=STEPS)
    effdiff.accelerate(pipe, recipe)
    quantized = sample(pipe, steps=STEPS)
    method = pipe.effdiff.methods[0]
    chosen = [d.name for d in method.decisions if d.quantize]
    assert chosen and not torch.equal(quantized, baseline) and torch.isfinite(quantized).all()
    method.save(tmp_path / "plan.json")
    pipe.effdiff.remove()
    assert torch.equal(sample(pipe, steps=STEPS), baseline)
    assert all(type(pipe.unet.get_submodule(n)) is nn.Linear for n in chosen)  # the float layers, back
    name = recipe.split(":")[0]
    effdiff.accelerate(pipe, f"{name}:backend=torchao,load={tmp_path / 'plan.json'}")
    assert torch.equal(sample(pipe, steps=STEPS), quantized)
    assert [d.name for d in pipe.effdiff.methods[0].decisions if d.quantize] == chosen


def test_measuring_keeps_the_float_layers_where_torchao_loses():
    pipe = make_tiny_sd()
    baseline = sample(pipe, steps=STEPS)
    effdiff.accelerate(pipe, "int8:backend=torchao,min_speedup=100,min_features=1")
    assert torch.equal(sample(pipe, steps=STEPS), baseline)
    method = pipe.effdiff.methods[0]
    assert method.measurements and "measured under 100x" in method.describe()


def test_where_the_kernel_cannot_run_the_method_is_refused_with_the_reason(tmp_path):
    pipe = make_tiny_sd()
    with pytest.raises(RecipeError, match="fp8 runs on cuda, not on cpu"):
        effdiff.accelerate(pipe, "fp8")
    with pytest.raises(RecipeError, match="int4 weight-only kernel .* runs on CUDA; the denoiser is on cpu"):
        effdiff.accelerate(pipe, "int4wo:backend=torchao")
    (tmp_path / "other.json").write_text('{"format": "effdiff torchao plan", "method": "int8wo", "layers": []}')
    with pytest.raises(RecipeError, match="is not a int8 torchao plan"):
        effdiff.accelerate(pipe, f"int8:backend=torchao,load={tmp_path / 'other.json'}")
    (tmp_path / "bad.json").write_text('{"format": "effdiff torchao plan", "method": "int8", "layers": ["conv_in"]}')
    with pytest.raises(RecipeError, match="'conv_in', which is not a linear layer"):
        effdiff.accelerate(pipe, f"int8:backend=torchao,load={tmp_path / 'bad.json'}")
    with pytest.raises(RecipeError, match="save\\(\\) needs the method applied"):
        effdiff.get_method("int8")(backend="torchao").save(tmp_path / "x.json")


@needs_fp8_gpu
def test_fp8_on_the_gpu_quantizes_the_wide_layers_and_removes_bit_identically():
    pipe = make_tiny_sd().to("cuda", torch.bfloat16)
    baseline = sample(pipe, steps=STEPS)
    effdiff.accelerate(pipe, "fp8:select=rule,min_features=64")
    out = sample(pipe, steps=STEPS)
    assert torch.isfinite(out).all() and any(d.quantize for d in pipe.effdiff.methods[0].decisions)
    pipe.effdiff.remove()
    assert torch.equal(sample(pipe, steps=STEPS), baseline)
