"""Progressive distillation: each round, a student learns to take in one DDIM step what its teacher takes in two.

Salimans & Ho (Progressive Distillation for Fast Sampling of Diffusion Models, arXiv 2202.00512): the student of a
round with N steps starts from its teacher (the previous round's student) and, from a point ``z_t`` on the N-step
grid, must land where two teacher steps land, ``z_t''``. Its target is the clean sample that makes one DDIM step do
that, ``x̃ = (z_t'' − (σ''/σ)·z_t) / (α'' − (σ''/σ)·α)``, weighted by the truncated SNR ``max(α²/σ², 1)``. The
first round's teacher is the original model with classifier-free guidance at the baseline's scale (Meng et al.,
arXiv 2210.03142, distil guidance and steps together), so every student samples in one pass per step.

The grids are diffusers' ``DDIMScheduler`` with ``timestep_spacing="trailing"`` (the first step at t = T − 1, so one
step starts from pure noise) and its previous-timestep rule ``t − T // N``: a student trained here samples with that
scheduler unchanged. Every round's student is exported (``steps-8``, ``steps-4``, …).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from effdiff.distill.phased import PhasedTrainer
from effdiff.distill.teacher import (
    Denoiser,
    alpha_at,
    clean_and_noise,
    ddim_step,
    guided_prediction,
    student_timesteps,
)
from effdiff.distill.trainer import DistillConfig, denoiser_call


def step_schedule(start_steps: int, last_steps: int) -> list[int]:
    """The students' step counts, halving from ``start_steps`` down to ``last_steps``."""
    if last_steps < 1 or start_steps < last_steps or start_steps % last_steps or (
            start_steps // last_steps) & (start_steps // last_steps - 1):
        raise ValueError(f"progressive: start steps ({start_steps}) must be the last steps ({last_steps}) times a "
                         "power of two")
    return [start_steps >> i for i in range(int(math.log2(start_steps // last_steps)) + 1)]


@dataclass
class ProgressiveObjective:
    """The loss of one batch of one round (``steps``: the student's step count this round)."""

    teacher: Denoiser
    student: Denoiser
    alphas_cumprod: torch.Tensor
    final_alpha: float  # what DDIM uses past t = 0 (the scheduler's ``final_alpha_cumprod``)
    prediction_type: str
    steps: int
    guidance: float | None = None  # the teacher's CFG scale (first round), None: the teacher is one pass

    def _alpha(self, timesteps: torch.Tensor) -> torch.Tensor:
        return alpha_at(self.alphas_cumprod, timesteps, self.final_alpha)

    def _teacher(self, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor,
                 uncond: torch.Tensor) -> torch.Tensor:
        if self.guidance is None:
            with torch.no_grad():
                return self.teacher(noisy, timesteps, text)
        return guided_prediction(self.teacher, noisy, timesteps, text, uncond, self.guidance)

    def __call__(self, images: torch.Tensor, text: torch.Tensor, uncond: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
        batch, device = len(images), images.device
        total = len(self.alphas_cumprod)
        grid = student_timesteps(self.steps, total)
        start = grid[torch.randint(0, self.steps, (batch,), generator=generator)].to(device)
        middle, end = start - total // (2 * self.steps), start - total // self.steps
        noise = torch.randn(images.shape, generator=generator).to(device, images.dtype)
        a_start, a_middle, a_end = self._alpha(start), self._alpha(middle), self._alpha(end)
        noisy = a_start.sqrt() * images + (1 - a_start).sqrt() * noise
        with torch.no_grad():
            halfway = ddim_step(self._teacher(noisy, start, text, uncond), noisy, a_start, a_middle,
                                self.prediction_type)
            landed = ddim_step(self._teacher(halfway, middle.clamp(min=0), text, uncond), halfway, a_middle, a_end,
                               self.prediction_type)
            ratio = (1 - a_end).sqrt() / (1 - a_start).sqrt()
            target = (landed - ratio * noisy) / (a_end.sqrt() - ratio * a_start.sqrt())
        clean, _ = clean_and_noise(self.student(noisy, start, text), noisy, a_start, self.prediction_type)
        weight = (a_start / (1 - a_start)).clamp(min=1.0)
        return (weight * (clean.float() - target.float()) ** 2).mean()


class ProgressiveTrainer(PhasedTrainer):
    """One phase per round, ``steps-N``, of ``iterations / rounds`` steps each (the last takes the remainder); a
    round's EMA student becomes the next round's teacher."""

    def __init__(self, config: DistillConfig, run: Path, out: Path, pipe: Any = None) -> None:
        self.schedule = step_schedule(config.start_steps, config.eval_steps)
        super().__init__(config, run, out, pipe)

    def phase_plan(self, config: DistillConfig) -> list[tuple[str, int]]:
        rounds = len(self.schedule)
        if config.iterations < rounds:
            raise ValueError(f"progressive: {rounds} rounds need at least {rounds} iterations")
        per_round = config.iterations // rounds
        return [(f"steps-{steps}", per_round if i < rounds - 1 else config.iterations - per_round * i)
                for i, steps in enumerate(self.schedule)]

    def _objective(self) -> ProgressiveObjective:
        scheduler = self.pipe.scheduler
        return ProgressiveObjective(
            teacher=denoiser_call(self.teacher, self.is_dit), student=denoiser_call(self.student, self.is_dit),
            alphas_cumprod=self.alphas_cumprod, final_alpha=float(scheduler.final_alpha_cumprod),
            prediction_type=self.prediction_type, steps=self.schedule[0], guidance=self.config.guidance)

    def enter_phase(self, index: int) -> None:
        """Round ``index``: its step count, and the previous round's student as teacher (round one keeps the
        guided original)."""
        self.objective.steps = self.schedule[index]
        if index > 0:
            teacher = self.frozen_copy(self.kept[self.names[index - 1]])
            self.objective.teacher, self.objective.guidance = denoiser_call(teacher, self.is_dit), None

    def phase_record(self, name: str) -> dict[str, Any]:
        return {"steps": self.schedule[self.names.index(name)]}
