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

import effdiff
from effdiff import RecipeError
from effdiff.api import is_accelerated
from effdiff.methods.quant.lowbit.fake import TimestepActivation
from effdiff.methods.quant.lowbit.tdq import fit_generators

STEPS = 4
FAST = "prompts=2,steps=4,iters=0,fit=200"  # one small calibration call, rounding to nearest, a short fit
W4A4 = f"tdq:wbits=4,abits=4,{FAST}"


pytestmark = pytest.mark.usefixtures("fresh_quant_memo")


def _activations(pipe) -> dict[str, TimestepActivation]:
    """The live timestep-dependent quantizer of every patched layer."""
    return {name: vars(m)["forward"].activation for name, m in denoiser(pipe).named_modules()
            if "forward" in vars(m) and isinstance(vars(m)["forward"].activation, TimestepActivation)}


def test_nothing_quantized_is_bit_identical(tiny_pipe):
    baseline = sample(tiny_pipe, steps=STEPS)
    effdiff.accelerate(tiny_pipe, f"tdq:wbits=32,abits=32,{FAST}")
    method = tiny_pipe.effdiff.methods[0]
    assert method.layers and all(r.act_gen is None for r in method.layers.values())
    assert torch.equal(sample(tiny_pipe, steps=STEPS), baseline)


def test_quantizes_then_remove_restores_bit_for_bit(tiny_pipe):
    baseline = sample(tiny_pipe, steps=STEPS)
    state = {k: v.clone() for k, v in denoiser(tiny_pipe).state_dict().items()}
    effdiff.accelerate(tiny_pipe, W4A4)
    quantized = sample(tiny_pipe, steps=STEPS)
    assert torch.isfinite(quantized).all() and not torch.equal(quantized, baseline)
    assert (quantized - baseline).abs().mean() < 0.3  # quantized, not broken
    assert "simulated" in tiny_pipe.effdiff.describe()
    tiny_pipe.effdiff.remove()
    assert not any("forward" in vars(m) for m in denoiser(tiny_pipe).modules())
    assert all(torch.equal(v, state[k]) for k, v in denoiser(tiny_pipe).state_dict().items())
    assert torch.equal(sample(tiny_pipe, steps=STEPS), baseline)


def test_grids_follow_the_timestep(tiny_sd):
    effdiff.accelerate(tiny_sd, W4A4)
    method = tiny_sd.effdiff.methods[0]
    assert method.info["timesteps"] == STEPS and method.info["span_drift_median"] > 1.0
    acts = _activations(tiny_sd)
    assert len(acts) == len(method.layers)
    sample(tiny_sd, steps=STEPS)
    timesteps = tiny_sd.effdiff.context.timesteps
    differ = 0
    for act in acts.values():
        assert set(act._grids) == set(timesteps)  # every layer made exactly one grid per step it ran at
        first, last = act.at(timesteps[0]).grid, act.at(timesteps[-1]).grid
        differ += bool(((first.scale - last.scale).abs() / last.scale).max() > 0.01)
    assert differ >= len(acts) // 2  # most layers' step sizes move by more than 1 % over the trajectory
    # one layer called at two timesteps quantizes the same input with two grids
    name, act = next(iter(acts.items()))
    module = dict(denoiser(tiny_sd).named_modules())[name]
    channels = module.in_channels if hasattr(module, "in_channels") else module.in_features
    x = torch.randn(2, channels, 4, 4) if act.conv else torch.randn(2, 3, channels)
    outputs = []
    for t in (timesteps[0], timesteps[-1]):
        tiny_sd.effdiff.context.timestep = t
        outputs.append(act(x))
    assert not torch.equal(*outputs)


def test_unseen_timesteps_run_and_are_deterministic(tiny_pipe):
    effdiff.accelerate(tiny_pipe, W4A4)  # calibrated at 4 steps
    runs = [sample(tiny_pipe, steps=7) for _ in range(2)]  # 7 steps: timesteps never calibrated
    assert torch.isfinite(runs[0]).all() and torch.equal(*runs)
    seen = set(tiny_pipe.effdiff.context.timesteps)
    act = next(iter(_activations(tiny_pipe).values()))
    assert seen <= set(act._grids)


def test_save_and_reload_give_identical_outputs(tiny_pipe, tmp_path):
    path = tmp_path / "tdq.safetensors"
    method, reloaded = assert_reload_identical(tiny_pipe, W4A4, path, STEPS)
    for name, record in method.layers.items():
        assert torch.equal(record.act_gen, reloaded.layers[name].act_gen)
    with pytest.raises(RecipeError, match="calibrated with"):
        effdiff.accelerate(tiny_pipe, f"{W4A4},bands=2,calibration={path}")
    with pytest.raises(RecipeError, match="was saved by tdq"):
        effdiff.accelerate(tiny_pipe, f"qdiffusion:wbits=4,abits=4,prompts=2,steps=4,iters=0,calibration={path}")


def test_calibration_is_deterministic():
    assert_deterministic_calibration(make_tiny_dit, W4A4)


def test_generator_fits_drifting_ranges():
    t = torch.linspace(20, 980, 20)[None].repeat(2, 1)
    lo = torch.stack([-(0.2 + t[0] / 1000), -0.1 * torch.ones(20)])
    hi = torch.stack([1 + 3 * (t[0] / 1000) ** 2, 0.5 + 0.4 * torch.sin(t[0] / 300)])
    mask = torch.ones_like(t, dtype=torch.bool)
    net, worst = fit_generators(t, lo, hi, mask, bands=3, hidden=8, iters=1500, seed=0)
    assert worst.max() < 0.05  # within 5 % of each step's span at every calibrated step
    mid = (t[:, :-1] + t[:, 1:]) / 2  # between calibrated steps: smooth, not wiggling
    pred_lo, pred_hi = net.ranges(mid)
    true_hi = torch.stack([1 + 3 * (mid[0] / 1000) ** 2, 0.5 + 0.4 * torch.sin(mid[0] / 300)])
    assert ((pred_hi - true_hi).abs() / (true_hi - pred_lo)).max() < 0.05


def test_splits_unet_skip_concats(tiny_sd, tiny_dit):
    effdiff.accelerate(tiny_sd, W4A4)
    method = tiny_sd.effdiff.methods[0]
    for name in method.info["split_layers"]:
        record = method.layers[name]
        assert len(record.act_segments) == 3 and record.act_gen.shape[0] == 2
    effdiff.accelerate(tiny_dit, W4A4)
    assert all(r.act_gen.shape[0] == 1 for r in tiny_dit.effdiff.methods[0].layers.values())


@pytest.mark.parametrize(("recipe", "message"), [
    ("tdq:abits=1", "one of 2, 3, 4"),
    ("tdq:range=percentile", "one of minmax, mse"),
    ("tdq:bands=0", r"in \[1, 8\]"),
    ("tdq:hidden=1000", r"in \[2, 128\]"),
    ("tdq:fit=-1", r"in \[0, 20000\]"),
    ("tdq:band=2", "did you mean 'bands'"),
    ("tdq+qdiffusion", "both take over the weights"),
])
def test_bad_settings_refused(recipe, message):
    pipe = make_tiny_sd()
    with pytest.raises(RecipeError, match=message):
        effdiff.accelerate(pipe, recipe)
    assert not is_accelerated(pipe)
