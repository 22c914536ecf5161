"""The consistency objective's pieces: boundary condition, parameterisations, the solver grid LCMScheduler uses."""

from __future__ import annotations

import pytest
import torch
from diffusers import LCMScheduler

from effdiff.distill.consistency import ConsistencyObjective, boundary_scalings, solver_grid
from effdiff.zoo.architectures import default_scheduler


def test_the_boundary_scalings_are_lcmschedulers():
    scheduler = LCMScheduler.from_config(default_scheduler().config)
    timesteps = torch.tensor([0, 19, 259, 999])
    c_skip, c_out = boundary_scalings(timesteps)
    for i, t in enumerate(timesteps.tolist()):
        skip, out = scheduler.get_scalings_for_boundary_condition_discrete(t)
        assert c_skip[i].item() == pytest.approx(float(skip), rel=1e-5)
        assert c_out[i].item() == pytest.approx(float(out), rel=1e-5, abs=1e-12)
    assert c_skip[0].item() == 1.0 and c_out[0].item() == 0.0


def test_the_solver_grid_is_the_one_lcmscheduler_samples_from():
    grid, skip = solver_grid(1000, 50)
    assert skip == 20 and grid[0] == 19 and grid[-1] == 999 and len(grid) == 50
    scheduler = LCMScheduler.from_config(default_scheduler().config)
    scheduler.set_timesteps(4)
    assert set(scheduler.timesteps.tolist()) <= set(grid.tolist())


def test_the_guided_teacher_step_follows_the_noising_path_and_extrapolates_the_condition():
    """A teacher that knows the clean sample steps exactly along the noising path (same noise, lower level); with
    guidance w its clean estimate is uncond + w·(cond − uncond)."""
    alphas = default_scheduler().alphas_cumprod.float()
    gen = torch.Generator().manual_seed(1)
    clean, noise = torch.randn(3, 1, 4, 4, generator=gen), torch.randn(3, 1, 4, 4, generator=gen)
    shift = 0.25

    def teacher(noisy: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return clean.repeat(2, 1, 1, 1) + shift * text[:, :1, :1, None]  # text 0 (uncond) or 1 (cond)

    start, end = torch.tensor([519, 39, 999]), torch.tensor([499, 19, 979])
    alpha_start, alpha_end = alphas[start][:, None, None, None], alphas[end][:, None, None, None]
    noisy = alpha_start.sqrt() * clean + (1 - alpha_start).sqrt() * noise
    text, uncond = torch.ones(3, 2, 5), torch.zeros(3, 2, 5)
    plain = ConsistencyObjective(teacher, teacher, teacher, alphas, "sample", guidance=1.0)
    expected = alpha_end.sqrt() * (clean + shift) + (1 - alpha_end).sqrt() * (
        (noisy - alpha_start.sqrt() * (clean + shift)) / (1 - alpha_start).sqrt())
    assert torch.allclose(plain.teacher_step(noisy, start, end, text, uncond), expected, atol=1e-4)
    unguided = ConsistencyObjective(teacher, teacher, teacher, alphas, "sample", guidance=0.0)
    on_path = alpha_end.sqrt() * clean + (1 - alpha_end).sqrt() * noise
    assert torch.allclose(unguided.teacher_step(noisy, start, end, text, uncond), on_path, atol=1e-4)
