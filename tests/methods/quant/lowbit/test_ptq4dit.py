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
from effdiff.methods.quant.lowbit.fake import Observer
from effdiff.methods.quant.lowbit.ptq import naive_layer
from effdiff.methods.quant.lowbit.ptq4dit import balanced_layer, calibrated_salience, ranks, spearman, weight_salience
from effdiff.methods.quant.lowbit.svdquant import smoothing

STEPS = 4
FAST = "prompts=2,steps=4"


pytestmark = pytest.mark.usefixtures("fresh_quant_memo")


def test_ranks_average_ties_and_spearman():
    assert ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    a = torch.tensor([0.1, 5.0, 2.0, 9.0, 3.0])
    assert spearman(a, a.exp()) == pytest.approx(1.0)  # monotone transform: rank correlation 1
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, torch.ones(5)) == 0.0
    b = torch.tensor([1.0, 3.0, 2.0, 5.0, 4.0])  # d = [0, 1, 1, 1, 1]: 1 - 6 * 4 / (5 * 24) = 0.8
    assert spearman(torch.arange(5.0), b) == pytest.approx(0.8)


def test_ssc_weights_sum_to_one_and_favour_complementary_timesteps():
    w_sal = torch.tensor([8.0, 1.0, 1.5, 1.2, 0.9, 1.1])  # channel 0 is the salient weight channel
    same = torch.tensor([9.0, 1.0, 1.4, 1.3, 0.8, 1.2])  # activations salient where the weight is: rho high
    complementary = torch.tensor([0.1, 1.0, 0.7, 6.0, 2.0, 0.5])  # salient elsewhere: rho low
    per_step = torch.stack([same, complementary, same])
    salience, rhos = calibrated_salience(per_step, w_sal)
    eta = torch.softmax(-rhos, 0)
    assert rhos[0] > 0.5 and rhos[1] < 0 and float(eta.sum()) == pytest.approx(1.0)
    assert eta[1] > eta[0] and eta[1] > 1 / 3  # the complementary step outweighs each same-channel one
    assert torch.allclose(salience, (eta[:, None].float() * per_step).sum(0))
    plain_mean = per_step.mean(0)
    assert salience[3] > plain_mean[3] and salience[0] < plain_mean[0]  # pulled toward the low-rho step


@pytest.mark.parametrize("conv", [False, True])
def test_balancing_keeps_the_product_and_beats_naive_w4a4_on_outliers(conv):
    torch.manual_seed(0)
    module = nn.Conv2d(64, 32, 3, padding=1) if conv else nn.Linear(64, 32)
    x = torch.randn(8, 64, 6, 6) if conv else torch.randn(8, 20, 64)
    x[(slice(None), 5) if conv else (..., 5)] *= 30  # an activation outlier channel
    with torch.no_grad():
        module.weight[:, 9] *= 20  # and a weight outlier in another channel (the complementarity CSB uses)
    expected = module(x).detach()
    raw = Observer(conv=conv)
    raw.update(x)
    x_sal = Observer(conv=conv, per_channel=True)
    x_sal.update(x)
    factors = smoothing(x_sal.absmax, weight_salience(module.weight), 0.5)
    shape = (1, -1, 1, 1) if conv else (1, 1, -1)
    balanced_obs = Observer(conv=conv)
    balanced_obs.update(x / factors.reshape(shape))
    exact = balanced_layer(module, factors, balanced_obs, 32, 32, "minmax", 100.0).layer(module)
    balanced = balanced_layer(module, factors, balanced_obs, 4, 4, "minmax", 100.0).layer(module)
    naive = naive_layer(module, raw, 4, 4, "minmax", 100.0).layer(module)
    with torch.no_grad():
        assert torch.allclose(exact(x), expected, atol=1e-4, rtol=1e-5)
        balanced_err = (balanced(x) - expected).pow(2).mean()
        naive_err = (naive(x) - expected).pow(2).mean()
    assert balanced_err < 0.5 * naive_err


def test_nothing_quantized_without_balancing_is_bit_identical(tiny_pipe):
    baseline = sample(tiny_pipe, steps=STEPS)
    effdiff.accelerate(tiny_pipe, f"ptq4dit:wbits=32,abits=32,balance=false,{FAST}")
    assert tiny_pipe.effdiff.methods[0].layers and torch.equal(sample(tiny_pipe, steps=STEPS), baseline)


def test_balancing_alone_keeps_outputs(tiny_pipe):
    baseline = sample(tiny_pipe, steps=STEPS)
    effdiff.accelerate(tiny_pipe, f"ptq4dit:wbits=32,abits=32,{FAST}")
    method = tiny_pipe.effdiff.methods[0]
    assert all(r.smooth is not None and r.codes is None for r in method.layers.values())
    assert any(not torch.allclose(r.smooth, torch.ones_like(r.smooth)) for r in method.layers.values())
    assert method.info["timesteps"] == STEPS  # one salience vector per calibration timestep
    assert torch.allclose(sample(tiny_pipe, steps=STEPS), baseline, atol=1e-4)


@pytest.mark.parametrize("recipe", ["ptq4dit:wbits=4,abits=4", "ptq4dit:wbits=4,abits=8,range=minmax,ssc=false"])
def test_quantizes_then_remove_restores_bit_for_bit(tiny_pipe, recipe):
    baseline = sample(tiny_pipe, steps=STEPS)
    state = {k: v.clone() for k, v in denoiser(tiny_pipe).state_dict().items()}
    effdiff.accelerate(tiny_pipe, f"{recipe},{FAST}")
    method = tiny_pipe.effdiff.methods[0]
    out = sample(tiny_pipe, steps=STEPS)
    assert torch.isfinite(out).all() and not torch.equal(out, baseline)
    assert (out - baseline).abs().mean() < 0.2
    assert all(r.smooth is not None and r.codes is not None for r in method.layers.values())
    assert "simulated" in tiny_pipe.effdiff.describe()
    tiny_pipe.effdiff.remove()
    assert not any("forward" in vars(m) for m in denoiser(tiny_pipe).modules())
    assert all(torch.equal(v, state[k]) for k, v in denoiser(tiny_pipe).state_dict().items())
    assert torch.equal(sample(tiny_pipe, steps=STEPS), baseline)


def test_ssc_changes_the_factors(tiny_dit):
    effdiff.accelerate(tiny_dit, f"ptq4dit:wbits=4,abits=8,{FAST}")
    with_ssc = tiny_dit.effdiff.methods[0]
    assert -1 <= with_ssc.info["rho_min"] <= with_ssc.info["rho_mean"] <= with_ssc.info["rho_max"] <= 1
    tiny_dit.effdiff.remove()
    effdiff.accelerate(tiny_dit, f"ptq4dit:wbits=4,abits=8,ssc=false,{FAST}")
    plain = tiny_dit.effdiff.methods[0]
    # the rho-weighted mean never exceeds the maximum over timesteps, and is below it somewhere
    pairs = [(with_ssc.layers[n].smooth, plain.layers[n].smooth) for n in plain.layers]
    assert all((a <= b * (1 + 1e-5)).all() for a, b in pairs) and any((a < b * 0.99).any() for a, b in pairs)


def test_save_reload_identical(tiny_pipe, tmp_path):
    path = tmp_path / "ptq4dit.safetensors"
    assert_reload_identical(tiny_pipe, f"ptq4dit:wbits=4,abits=8,{FAST}", path, STEPS)
    with pytest.raises(RecipeError, match="calibrated with"):
        effdiff.accelerate(tiny_pipe, f"ptq4dit:wbits=4,abits=8,ssc=false,{FAST},calibration={path}")
    with pytest.raises(RecipeError, match="was saved by ptq4dit"):
        effdiff.accelerate(tiny_pipe, f"ptq:wbits=4,abits=8,{FAST},calibration={path}")


def test_calibration_is_deterministic():
    assert_deterministic_calibration(make_tiny_sd, f"ptq4dit:wbits=4,abits=4,{FAST}")


@pytest.mark.parametrize(("recipe", "message"), [
    ("ptq4dit:wbits=9", "one of 2, 3, 4"),
    ("ptq4dit:abits=1", "one of 2, 3, 4"),
    ("ptq4dit:range=kl", "one of minmax, percentile, mse"),
    ("ptq4dit:balance=maybe", "true or false"),
    ("ptq4dit:percentile=50", r"float in \[90, 100\]"),
    ("ptq4dit+svdquant", "both take over the weights"),
])
def test_bad_settings_refused(recipe, message):
    pipe = make_tiny_dit()
    with pytest.raises(RecipeError, match=message):
        effdiff.accelerate(pipe, recipe)
    assert not is_accelerated(pipe)
