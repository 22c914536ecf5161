import json

import pytest
import torch
from conftest import sample

import effdiff
from effdiff.methods.solvers.schedule import accepts_timesteps
from effdiff.methods.solvers.schedulers import SCHEDULERS


@pytest.mark.parametrize("spec", SCHEDULERS, ids=lambda s: s.name)
def test_each_solver_swaps_runs_and_restores(tiny_sd, spec):
    original = tiny_sd.scheduler
    effdiff.accelerate(tiny_sd, f"{spec.name}:steps=3")
    assert type(tiny_sd.scheduler).__name__ == spec.scheduler
    for key, value in spec.config.items():
        assert tiny_sd.scheduler.config[key] == value
    out = sample(tiny_sd, steps=3)
    assert torch.isfinite(out).all()
    tiny_sd.effdiff.remove()
    assert tiny_sd.scheduler is original


def test_karras_flag_reaches_scheduler(tiny_dit):
    effdiff.accelerate(tiny_dit, "dpmpp2m:karras=true")
    assert tiny_dit.scheduler.config.use_karras_sigmas is True
    assert "karras" not in effdiff.get_method("euler-a").params


def test_ays_optimises_caches_and_applies(tiny_sd, tmp_path):
    cache = tmp_path / "s.json"
    recipe = f"ays:steps=4,ref_steps=12,seeds=2,rounds=2,cache={cache}"
    baseline = sample(tiny_sd, steps=4)
    effdiff.accelerate(tiny_sd, recipe)
    method = tiny_sd.effdiff.methods[0]
    record = method.record
    assert accepts_timesteps(tiny_sd.scheduler)
    assert record["loss_optimised"] <= record["loss_default"] and record["pipeline_calls"] > 1
    ts = record["timesteps"]
    assert len(ts) == 4 and all(a > b for a, b in zip(ts, ts[1:], strict=False))
    seen = []
    tiny_sd.unet.register_forward_pre_hook(lambda m, a: seen.append(float(a[1])))
    sample(tiny_sd, steps=4)
    assert seen == [float(t) for t in ts]
    assert json.loads(cache.read_text())  # saved
    tiny_sd.effdiff.remove()
    assert torch.equal(baseline, sample(tiny_sd, steps=4))
    # second application reuses the file: no optimisation runs (no denoiser calls)
    seen.clear()
    effdiff.accelerate(tiny_sd, recipe)
    assert seen == [] and tiny_sd.effdiff.methods[0].record == record


def test_ays_stacks_after_a_timestep_capable_solver(tiny_dit, tmp_path):
    cache = tmp_path / "a.json"
    effdiff.accelerate(tiny_dit, f"ays:steps=3,ref_steps=6,seeds=1,rounds=1,cache={cache}+euler:steps=9")
    assert [m.name for m in tiny_dit.effdiff.methods] == ["euler", "ays"]
    assert type(tiny_dit.scheduler).__name__ == "EulerDiscreteScheduler"
    calls = []
    tiny_dit.transformer.register_forward_pre_hook(lambda m, a: calls.append(1))
    sample(tiny_dit, steps=3)
    assert len(calls) == 3


def test_fingerprint_ignores_where_the_weights_were_loaded_from(tiny_sd):
    """A checkout in another folder must match the records shipped with the bundled models (CI found it did not)."""
    from effdiff.adapters import find_denoiser
    from effdiff.methods.solvers.schedule import model_fingerprint

    unet = find_denoiser(tiny_sd)
    before = model_fingerprint(unet)
    unet.register_to_config(_name_or_path="/somewhere/else/unet", _diffusers_version="0.0.0")
    assert model_fingerprint(unet) == before
    with torch.no_grad():
        next(unet.parameters()).flatten()[0] += 1.0
    assert model_fingerprint(unet) != before
