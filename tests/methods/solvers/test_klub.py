"""Align Your Steps' KL upper bound: the estimator against its closed form, the search, the method end to end."""

import math

import pytest
import torch

import effdiff
from effdiff.methods.solvers.klub import Draws, NoiseLevels, candidates_between, interval_klub, optimise

C = 0.5


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The ideal denoiser of data ~ N(0, C^2): D(x, sigma) = C^2 / (C^2 + sigma^2) x."""
    return C**2 / (C**2 + sigma.reshape(-1, 1) ** 2) * x


def closed_form(lo: float, hi: float) -> float:
    """2 * integral sigma^-3 C^4 (1/(sigma^2+C^2) - 1/(hi^2+C^2)) d sigma (the paper's Lemma 3.3), numerically."""
    grid = torch.logspace(math.log10(lo), math.log10(hi), 200001, dtype=torch.float64)
    f = 2 * grid**-3 * C**4 * (1 / (grid**2 + C**2) - 1 / (hi**2 + C**2))
    return float(torch.trapezoid(f, grid))


def levels() -> NoiseLevels:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # SD's scaled-linear table
    alphas = torch.cumprod(1 - betas, 0)
    return NoiseLevels(((1 - alphas) / alphas).sqrt())


def test_importance_sampled_bound_matches_the_gaussian_closed_form():
    x0 = C * torch.randn(64, 256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for lo, hi in [(0.05, 0.4), (0.3, 3.0), (2.0, 14.0)]:
        draws = Draws.make(64, x0, torch.Generator().manual_seed(1))
        estimate = interval_klub(gaussian_denoiser, x0, lo, hi, C, draws)
        assert estimate == pytest.approx(closed_form(lo, hi), rel=0.05), (lo, hi)


def test_bound_grows_with_the_step_and_vanishes_for_an_empty_one():
    x0 = C * torch.randn(16, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    draws = Draws.make(32, x0, torch.Generator().manual_seed(1))
    small = interval_klub(gaussian_denoiser, x0, 1.0, 1.5, C, draws)
    large = interval_klub(gaussian_denoiser, x0, 0.5, 3.0, C, draws)
    assert 0 < small < large
    assert interval_klub(gaussian_denoiser, x0, 1.0, 1.0, C, draws) == 0.0


def test_noise_levels_invert_at_integer_timesteps():
    table = levels()
    ts = torch.tensor([0, 1, 17, 500, 998, 999])
    back = table.timestep(table.sigmas[ts])
    assert torch.allclose(back, ts.double(), atol=1e-9)


def test_candidates_lie_strictly_between_the_neighbours_and_keep_the_current():
    table = levels()
    picks = candidates_between(table, 100, 400, 250, 11)
    assert 250 in picks and all(100 < t < 400 for t in picks) and len(picks) >= 8
    assert candidates_between(table, -1, 30, 10, 11)[0] == 0
    assert candidates_between(table, 10, 11, 10, 11) == [10]


def test_search_never_returns_a_schedule_its_check_scores_worse_than_the_default():
    table = levels()
    x0 = C * torch.randn(8, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    default = [999, 749, 499, 249]

    def check(schedule: list[int]) -> float:  # prefers the last step low: any real preference works
        return float(schedule[-1])

    record = optimise(gaussian_denoiser, x0, table, default, sweeps=3, candidates=11, samples=8, seed=0,
                      budget_s=60, checkpoint=check)
    ts = record["timesteps"]
    assert ts[0] == 999 and all(a > b for a, b in zip(ts, ts[1:], strict=False))
    assert record["loss_optimised"] <= record["loss_default"] == 249
    assert record["history"] and record["evaluations"] > 3


def test_ays_klub_runs_deterministically_on_a_pipeline(tiny_sd, tmp_path):
    recipe = "ays:steps=4,ref_steps=12,seeds=2,rounds=1,samples=2,cache={}"
    effdiff.accelerate(tiny_sd, recipe.format(tmp_path / "a.json"))
    first = tiny_sd.effdiff.methods[0].record
    tiny_sd.effdiff.remove()
    effdiff.accelerate(tiny_sd, recipe.format(tmp_path / "b.json"))
    second = tiny_sd.effdiff.methods[0].record
    assert first["objective"] == "klub" and first["timesteps"] == second["timesteps"]
    assert first["klub_default"] > 0 and first["loss_optimised"] <= first["loss_default"]
