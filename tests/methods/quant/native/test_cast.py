import pytest
import torch
from _stock import build_sd
from conftest import denoiser as model_of
from conftest import make_tiny_sd, sample
from diffusers.utils import BaseOutput

import effdiff
from effdiff import RecipeError
from effdiff.api import is_accelerated
from effdiff.methods.quant.native import cast, kernels

STEPS = 3


def _float_params(module):
    return {n: p for n, p in module.named_parameters() if p.is_floating_point()}


@pytest.mark.parametrize("recipe", ["bf16", "fp16"])
def test_refused_where_the_dtype_is_only_emulated(tiny_sd, monkeypatch, recipe):
    monkeypatch.setattr(cast, "native_float", lambda device, dtype: False)
    before = dict(_float_params(tiny_sd.unet))
    with pytest.raises(RecipeError, match="emulated=true"):
        effdiff.accelerate(tiny_sd, recipe)
    assert not is_accelerated(tiny_sd) or not tiny_sd.effdiff.methods
    assert all(p is before[n] for n, p in _float_params(tiny_sd.unet).items())


@pytest.mark.parametrize("recipe", ["bf16:emulated=true", "fp16:emulated=true", "bf16:emulated=true,keep=all"])
def test_casts_then_remove_restores_the_original_parameters(tiny_pipe, recipe):
    denoiser = model_of(tiny_pipe)
    originals = dict(_float_params(denoiser))
    copies = {n: p.detach().clone() for n, p in originals.items()}
    baseline = sample(tiny_pipe, steps=STEPS)
    effdiff.accelerate(tiny_pipe, recipe)
    dtype = tiny_pipe.effdiff.methods[0].dtype
    kept = tiny_pipe.effdiff.methods[0].kept
    assert kept, "the timestep embedding stays float32 by default"
    for name, p in _float_params(denoiser).items():
        inside_kept = any(name.startswith(k + ".") for k in kept)
        assert p.dtype == (torch.float32 if inside_kept else dtype), name
    assert denoiser.dtype == torch.float32  # what the pipeline sees: its latents and solver stay float32
    images = sample(tiny_pipe, steps=STEPS)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert not torch.equal(images, baseline)
    tiny_pipe.effdiff.remove()
    assert type(denoiser).__dict__.get("dtype") is None  # the reporting subclass is gone
    for name, p in _float_params(denoiser).items():
        assert p is originals[name] and torch.equal(p, copies[name])
    assert torch.equal(sample(tiny_pipe, steps=STEPS), baseline)


def test_latents_and_solver_stay_float32(tiny_sd):
    effdiff.accelerate(tiny_sd, "dpmpp2m:steps=3+bf16:emulated=true")
    seen = []

    def record(pipe, i, t, tensors):
        seen.append(tensors["latents"].dtype)
        return tensors

    sample(tiny_sd, steps=3, callback_on_step_end=record)
    assert seen == [torch.float32] * 3


def test_close_to_float32_on_tiny_sd(tiny_sd):
    baseline = sample(tiny_sd, steps=STEPS)
    effdiff.accelerate(tiny_sd, "fp16:emulated=true")
    assert (sample(tiny_sd, steps=STEPS) - baseline).abs().max() < 0.02


def test_composes_with_deepcache_and_a_solver(tiny_sd):
    baseline = sample(tiny_sd, steps=6)
    effdiff.accelerate(tiny_sd, "deepcache:interval=2+dpmpp2m:steps=6+bf16:emulated=true")
    assert [m.name for m in tiny_sd.effdiff.methods] == ["dpmpp2m", "bf16", "deepcache"]
    images = sample(tiny_sd, steps=6)
    assert torch.isfinite(images).all() and tiny_sd.effdiff.methods[-1].stats.cached > 0
    tiny_sd.effdiff.remove()
    assert torch.equal(sample(tiny_sd, steps=6), baseline)


def test_vae_and_text_encoder_of_a_stock_pipeline():
    pipe = build_sd()
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe("a red apple", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="pt").images

    baseline = run()
    effdiff.accelerate(pipe, "bf16:emulated=true,text_encoder=true")
    assert pipe.vae.decoder.conv_in.weight.dtype == torch.bfloat16
    assert next(pipe.text_encoder.parameters()).dtype == torch.bfloat16
    assert pipe.vae.dtype == pipe.text_encoder.dtype == torch.float32
    images = run()
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    pipe.effdiff.remove()
    assert torch.equal(run(), baseline)


def test_text_encoder_cast_forgets_cached_captions():
    pipe = make_tiny_sd()
    baseline = sample(pipe, steps=2)
    effdiff.accelerate(pipe, "bf16:emulated=true,text_encoder=true")
    sample(pipe, steps=2)  # caches bf16-encoded captions
    pipe.effdiff.remove()
    assert torch.equal(sample(pipe, steps=2), baseline)


def test_convert_reaches_into_outputs_and_dtype_arguments():
    out = BaseOutput(sample=torch.ones(2, dtype=torch.bfloat16))
    converted = cast.convert((out, [torch.ones(1, dtype=torch.bfloat16)], {"hidden_dtype": torch.bfloat16}),
                             torch.bfloat16, torch.float32)
    assert converted[0].sample.dtype == torch.float32 and converted[0]["sample"].dtype == torch.float32
    assert converted[1][0].dtype == torch.float32 and converted[2]["hidden_dtype"] == torch.float32
    assert cast.convert(torch.ones(1, dtype=torch.int64), torch.bfloat16, torch.float32).dtype == torch.int64


@pytest.mark.parametrize(("recipe", "match"), [
    ("bf16:keep=everything", "keep"),
    ("bf16:emulated=maybe", "emulated"),
    ("bf16:emulated=true+ptq", "float dtype"),
    ("bf16:emulated=true+fp16:emulated=true", "float dtype"),
])
def test_bad_recipes_refused(tiny_sd, recipe, match):
    with pytest.raises(RecipeError, match=match):
        effdiff.accelerate(tiny_sd, recipe)


@pytest.mark.skipif(not kernels.int8_engine_available(), reason="no fbgemm engine in this torch")
@pytest.mark.parametrize("written", ["int8:min_features=1,min_channels=1,convs=true+bf16:emulated=true",
                                     "bf16:emulated=true+int8:min_features=1,min_channels=1,convs=true"])
def test_int8_stacks_on_bf16_and_removal_restores(tiny_pipe, written):
    """The cast goes first whatever the written order; the int8 layers run inside the bf16 model."""
    denoiser = model_of(tiny_pipe)
    originals = dict(_float_params(denoiser))
    baseline = sample(tiny_pipe, steps=STEPS)
    effdiff.accelerate(tiny_pipe, written)
    assert [m.name for m in tiny_pipe.effdiff.methods] == ["bf16", "int8"]
    int8 = tiny_pipe.effdiff.methods[1]
    layers = int8.quantized_layers().values()
    assert layers and all(isinstance(m, (kernels.Int8DynamicConv2d, kernels.Int8DynamicLinear)) for m in layers)
    assert all(m.scale.dtype == torch.float32 for m in layers)  # quantized after the cast: scales not rounded
    images = sample(tiny_pipe, steps=STEPS)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert (images - baseline).abs().max() < 0.5
    tiny_pipe.effdiff.remove()
    assert all(p is originals[n] for n, p in _float_params(denoiser).items())
    assert torch.equal(sample(tiny_pipe, steps=STEPS), baseline)


@pytest.mark.skipif(not kernels.int8_engine_available(), reason="no fbgemm engine in this torch")
def test_a_bf16_int8_file_reloads_only_under_the_same_cast(tiny_sd, tmp_path):
    path = tmp_path / "q.safetensors"
    effdiff.accelerate(tiny_sd, "bf16:emulated=true+int8:min_features=1,min_channels=1,convs=true")
    quantized = sample(tiny_sd, steps=STEPS)
    tiny_sd.effdiff.methods[1].save(path)
    tiny_sd.effdiff.remove()
    with pytest.raises(RecipeError, match="same cast"):
        effdiff.accelerate(tiny_sd, f"int8:load={path}")
    effdiff.accelerate(tiny_sd, f"bf16:emulated=true+int8:load={path}")
    assert torch.equal(sample(tiny_sd, steps=STEPS), quantized)
