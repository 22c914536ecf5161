import pytest
import torch
from conftest import (
    assert_deterministic_calibration,
    assert_reload_identical,
    denoiser,
    make_tiny_dit,
    make_tiny_sd,
    sample,
)
from torch import nn

import effdiff
from effdiff import RecipeError
from effdiff.api import is_accelerated
from effdiff.methods.quant.lowbit.fake import DynamicActivation, Observer
from effdiff.methods.quant.lowbit.ptq import naive_layer
from effdiff.methods.quant.lowbit.viditq import hadamard, rotate_input, rotated_layer, rotation, viditq_layer

STEPS = 4
FAST = "prompts=2,steps=4"


pytestmark = pytest.mark.usefixtures("fresh_quant_memo")


def test_hadamard_and_rotations_are_orthogonal_and_seeded():
    h = hadamard(8)
    assert torch.equal(h @ h.T, 8 * torch.eye(8, dtype=torch.float64)) and set(h.unique().tolist()) == {-1.0, 1.0}
    with pytest.raises(ValueError):
        hadamard(12)
    for width in (1, 3, 64, 96, 384):
        r = rotation(width, 0)
        assert r.shape == (width, width) and r.dtype == torch.float32
        assert torch.allclose(r @ r.T, torch.eye(width), atol=1e-6)
    assert (rotation(64, 0).abs() - 1 / 8).abs().max() < 1e-7  # a (signed) Hadamard: every entry +-1/sqrt(64)
    assert (rotation(96, 0) != 0).all()  # 32 x 3: every channel mixes with every other
    assert torch.equal(rotation(96, 0), rotation.__wrapped__(96, 0))  # regenerated bit for bit
    assert not torch.equal(rotation(96, 0), rotation(96, 1))


def test_rotation_spreads_an_outlier_channel():
    x = torch.randn(50, 96, generator=torch.Generator().manual_seed(0))
    x[:, 7] *= 50
    rotated = rotate_input(x, rotation(96, 0), conv=False)
    peak = lambda t: float((t.abs().amax(1) / t.pow(2).mean(1).sqrt()).mean())  # noqa: E731
    assert peak(rotated) < 0.5 * peak(x)
    assert torch.allclose(rotated.norm(dim=1), x.norm(dim=1), rtol=1e-5)


def test_dynamic_per_token_error_bound():
    x = torch.randn(3, 10, 32, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 2, 10)[:, None]
    for bits in (4, 8):
        q = DynamicActivation(bits, 32, conv=False)(x)
        step = x.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)  # one grid per token
        assert ((q - x).abs() <= step / 2 + 1e-6).all()
        assert torch.allclose(q.abs().amax(-1), x.abs().amax(-1))  # each token's extreme is exact


def _outlier_layer(conv: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    module = nn.Conv2d(96, 32, 3, padding=1) if conv else nn.Linear(96, 32)
    x = torch.randn(4, 96, 6, 6) if conv else torch.randn(4, 20, 96)
    x[(slice(None), 5) if conv else (..., 5)] *= 30  # an activation outlier channel
    x[(slice(None), 40) if conv else (..., 40)] *= 10
    with torch.no_grad():
        module.weight[:, 9] *= 20  # and an outlier weight column
    observer = Observer(conv=conv, per_channel=True)
    observer.update(x)
    return module, x, observer.absmax


@pytest.mark.parametrize("conv", [False, True])
def test_unquantized_smoothed_rotated_layer_reproduces_the_float_layer(conv):
    module, x, absmax = _outlier_layer(conv)
    record = viditq_layer(module, absmax, 32, 32, 0.5, rotation(96, 0), 0, "mse")
    assert record.smooth is not None and not torch.allclose(record.smooth, torch.ones(96))
    layer = rotated_layer(record, module, rotation(96, 0))
    assert not torch.equal(layer.weight, module.weight)
    with torch.no_grad():
        assert torch.allclose(layer(x), module(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("conv", [False, True])
def test_balancing_beats_dynamic_quantization_alone_and_naive_w4a4(conv):
    module, x, absmax = _outlier_layer(conv)
    rot = rotation(96, 0)
    with torch.no_grad():
        expected = module(x)
        err = {}
        for label, smooth, r in (("both", absmax, rot), ("smooth", absmax, None), ("none", None, None)):
            layer = rotated_layer(viditq_layer(module, smooth, 4, 4, 0.5, r, 0, "minmax"), module, r)
            err[label] = float((layer(x) - expected).pow(2).mean())
        observer = Observer(conv=conv)
        observer.update(x)
        err["naive"] = float((naive_layer(module, observer, 4, 4, "minmax", 100.0).layer(module)(x) - expected)
                             .pow(2).mean())
    assert err["both"] < 0.5 * err["none"] < 0.5 * err["naive"]
    assert err["both"] < err["smooth"]


def test_float_bits_are_bit_identical(tiny_pipe):
    baseline = sample(tiny_pipe, steps=STEPS)
    effdiff.accelerate(tiny_pipe, f"viditq:wbits=32,abits=16,{FAST}")
    method = tiny_pipe.effdiff.methods[0]
    assert method.layers and all(r.smooth is None for r in method.layers.values())
    assert torch.equal(sample(tiny_pipe, steps=STEPS), baseline)


@pytest.mark.parametrize("recipe", ["viditq:wbits=4,abits=4", "viditq:wbits=32,abits=8,group=32,range=minmax"])
def test_quantizes_then_remove_restores_bit_for_bit(tiny_pipe, recipe):
    baseline = sample(tiny_pipe, steps=STEPS)
    state = {k: v.clone() for k, v in denoiser(tiny_pipe).state_dict().items()}
    effdiff.accelerate(tiny_pipe, f"{recipe},{FAST}")
    method = tiny_pipe.effdiff.methods[0]
    out = sample(tiny_pipe, steps=STEPS)
    assert torch.isfinite(out).all() and not torch.equal(out, baseline)
    assert (out - baseline).abs().mean() < 0.2
    assert all(r.smooth is not None and r.act_group > 0 for r in method.layers.values())
    assert "simulated" in tiny_pipe.effdiff.describe()
    tiny_pipe.effdiff.remove()
    assert not any("forward" in vars(m) for m in denoiser(tiny_pipe).modules())
    assert all(torch.equal(v, state[k]) for k, v in denoiser(tiny_pipe).state_dict().items())
    assert torch.equal(sample(tiny_pipe, steps=STEPS), baseline)


def test_save_reload_identical(tiny_pipe, tmp_path):
    path = tmp_path / "viditq.safetensors"
    # the reloaded layers regenerate their rotations
    assert_reload_identical(tiny_pipe, f"viditq:wbits=4,abits=4,{FAST}", path, STEPS, rotation.cache_clear)
    with pytest.raises(RecipeError, match="calibrated with"):
        effdiff.accelerate(tiny_pipe, f"viditq:wbits=4,abits=4,rotate=false,{FAST},calibration={path}")


def test_calibration_is_deterministic():
    assert_deterministic_calibration(make_tiny_sd, f"viditq:wbits=4,abits=4,{FAST}")


@pytest.mark.parametrize(("recipe", "message"), [
    ("viditq:wbits=9", "one of 2, 3, 4"),
    ("viditq:abits=1", "one of 2, 3, 4"),
    ("viditq:alpha=1.5", r"float in \[0, 1\]"),
    ("viditq:group=-1", r"int in \[0, 65536\]"),
    ("viditq:range=percentile", "one of minmax, mse"),
    ("viditq:rotate=maybe", "true or false"),
    ("viditq+svdquant", "both take over the weights"),
])
def test_bad_settings_refused(recipe, message):
    pipe = make_tiny_dit()
    with pytest.raises(RecipeError, match=message):
        effdiff.accelerate(pipe, recipe)
    assert not is_accelerated(pipe)
