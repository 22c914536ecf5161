"""Rectified flow distillation (InstaFlow): reflow on the teacher's own noise → image couplings, then one step.

Liu et al., Flow Straight and Fast (arXiv 2209.03003) and InstaFlow (arXiv 2309.06380). Three stages, here two
phases of one run:

1. **Couplings.** ``couplings`` noises, each with a training caption, are carried to images by the teacher's
   deterministic sampler (DDIM, ``coupling_steps`` trailing steps, classifier-free guidance at the baseline's scale,
   so guidance is folded in as InstaFlow folds it). The dataset's images are not used, only its captions.
2. **Reflow** (phase ``reflow``, the 2-rectified flow). The student, initialised from the teacher, regresses the
   straight-line velocity between the two ends of a coupling, ``ε − X₀``, at points on the line between them.
   We keep the teacher's parameterisation and timesteps instead of switching to ``t·X₁ + (1 − t)·X₀``: a point
   ``α_t·X₀ + σ_t·ε`` of the noise schedule is the straight line's point ``s = σ_t / (α_t + σ_t)`` scaled by
   ``α_t + σ_t``, and the model's (x̂₀, ε̂) give the velocity ``ε̂ − x̂₀`` in either, so the regression has the
   same minimiser. The payoff: DDIM's step *is* Euler's step on the straight line (both move x̂₀ and ε̂ to the
   next point unchanged), so the reflowed student samples with diffusers' DDIMScheduler in any number of steps.
3. **One-step distillation** (phase ``onestep``). New couplings from the reflowed student (its own DDIM sampler,
   no CFG), and a student trained from it to land on their image from the noise in one step. InstaFlow uses an
   LPIPS loss here; no LPIPS network is available offline, so the loss is L2 on the image.

Exported: ``reflow/`` (samples in any number of steps) and ``onestep/``, each with its record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from effdiff.distill.couplings import Couplings, TeacherCouplings
from effdiff.distill.phased import PhasedTrainer
from effdiff.distill.teacher import Denoiser, alpha_at, clean_and_noise
from effdiff.distill.trainer import DistillConfig, denoiser_call

PHASES = ("reflow", "onestep")


@dataclass
class CouplingObjective:
    """A loss over rows of the couplings; a subclass says what the student must get right about them."""

    student: Denoiser
    alphas_cumprod: torch.Tensor
    prediction_type: str
    couplings: Couplings | None = None

    def __call__(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.loss(*(part[index] for part in self.couplings), generator)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor,
                text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cumulative alpha, x̂₀, ε̂) of the student at ``noisy``."""
        alpha = alpha_at(self.alphas_cumprod, timesteps, 1.0)
        return alpha, *clean_and_noise(self.student(noisy, timesteps, text), noisy, alpha, self.prediction_type)

    def loss(self, noise: torch.Tensor, images: torch.Tensor, text: torch.Tensor,
             generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError


class ReflowObjective(CouplingObjective):
    """Reflow on couplings: the student's velocity ``ε̂ − x̂₀`` at a point between a coupling's ends regresses the
    coupling's ``ε − X₀``."""

    def loss(self, noise, images, text, generator):
        timesteps = torch.randint(0, len(self.alphas_cumprod), (len(images),), generator=generator).to(images.device)
        alpha = alpha_at(self.alphas_cumprod, timesteps, 1.0)
        _, clean, noise_hat = self.predict(alpha.sqrt() * images + (1 - alpha).sqrt() * noise, timesteps, text)
        return ((noise_hat - clean).float() - (noise - images).float()).pow(2).mean()


class OneStepObjective(CouplingObjective):
    """One step from pure noise at the last timestep must land on the coupling's image."""

    def loss(self, noise, images, text, generator):
        timesteps = torch.full((len(images),), len(self.alphas_cumprod) - 1, device=images.device)
        _, clean, _ = self.predict(noise, timesteps, text)
        return (clean.float() - images.float()).pow(2).mean()


class RectflowTrainer(TeacherCouplings, PhasedTrainer):
    """Phases ``reflow`` (``reflow_share`` of the iterations) and ``onestep``; each draws its couplings when it
    begins (into the run folder, so a resumed run reads them back instead of sampling them again)."""

    def phase_plan(self, config: DistillConfig) -> list[tuple[str, int]]:
        reflow = round(config.iterations * config.reflow_share)
        if not 0 < reflow <= config.iterations:
            raise ValueError(f"rectflow: reflow_share {config.reflow_share} leaves no reflow iterations")
        plan = [("reflow", reflow), ("onestep", config.iterations - reflow)]
        return [(name, length) for name, length in plan if length]

    def _objective(self) -> ReflowObjective:
        return ReflowObjective(denoiser_call(self.student, self.is_dit), self.alphas_cumprod, self.prediction_type)

    def enter_phase(self, index: int) -> None:
        """``reflow``: the guided teacher's couplings. ``onestep``: the reflowed student's couplings and a fresh
        EMA (its task is no continuation of reflow's, so reflow's weights should not linger in the average)."""
        if self.names[index] == "reflow":
            self.objective.couplings = self.couplings_from(self.teacher, self.config.guidance,
                                                           self.run_dir / "couplings-teacher.pt")
            return
        reflowed = self.frozen_copy(self.kept["reflow"])
        couplings = self.couplings_from(reflowed, None, self.run_dir / "couplings-reflow.pt")
        self.objective = OneStepObjective(denoiser_call(self.student, self.is_dit), self.alphas_cumprod,
                                          self.prediction_type, couplings)
        if self.step == self.phase_start(index):
            self.ema.load_state_dict(self.parts.state_dict())

    def step_loss(self) -> torch.Tensor:
        self.follow_phase()
        rows = torch.randint(0, self.config.couplings, (self.config.batch_size,), generator=self.gen)
        return self.objective(rows.to(self.device), self.gen)

    def record(self) -> dict[str, Any]:
        c = self.config
        return {**super().record(),
                "data": f"{c.couplings} couplings: noise → the teacher's DDIM-{c.coupling_steps} sample with CFG "
                        f"{c.guidance}, under the training captions (no training image used)"}

    def phase_record(self, name: str) -> dict[str, Any]:
        return {"phase": name, **({"steps": 1} if name == "onestep" else {})}
