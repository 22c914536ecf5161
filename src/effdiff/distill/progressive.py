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

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from effdiff.distill import lora
from effdiff.distill.teacher import Denoiser, clean_and_noise, ddim_step, guided_prediction
from effdiff.distill.trainer import DistillConfig, DistillTrainer, denoiser_call, part_state


def student_timesteps(steps: int, train_timesteps: int) -> torch.Tensor:
    """The trailing DDIM grid of ``steps`` steps: round(T − i·T/steps) − 1."""
    return (torch.arange(train_timesteps, 0, -train_timesteps / steps).round() - 1).long()[:steps]


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
        table = self.alphas_cumprod.to(timesteps.device)
        alpha = torch.where(timesteps >= 0, table[timesteps.clamp(min=0)], torch.tensor(self.final_alpha))
        return alpha[:, None, None, None]

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


class ProgressiveTrainer(DistillTrainer):
    """Rounds of ``iterations / rounds`` steps each, the learning rate warming up and decaying per round; at a
    round's end its EMA student is kept (checkpointed and exported) and becomes the next round's teacher. The
    iterations fix where rounds end, so ``--resume`` keeps them."""

    resumable_changes = ("device", "checkpoint_every")

    def __init__(self, config: DistillConfig, run: Path, out: Path, pipe: Any = None) -> None:
        self.schedule = step_schedule(config.start_steps, config.eval_steps)
        self.rounds: dict[int, dict[str, torch.Tensor]] = {}  # steps -> EMA state of that round's student
        super().__init__(config, run, out, pipe)

    @property
    def per_round(self) -> int:
        return max(1, self.config.iterations // len(self.schedule))

    def round_of(self, step: int) -> int:
        return min(step // self.per_round, len(self.schedule) - 1)

    def _objective(self) -> ProgressiveObjective:
        scheduler = self.pipe.scheduler
        return ProgressiveObjective(
            teacher=denoiser_call(self.teacher, self.is_dit), student=denoiser_call(self.student, self.is_dit),
            alphas_cumprod=self.alphas_cumprod, final_alpha=float(scheduler.final_alpha_cumprod),
            prediction_type=self.prediction_type, steps=self.schedule[0], guidance=self.config.guidance)

    def _teacher_from(self, ema_state: dict[str, torch.Tensor]) -> torch.nn.Module:
        """A frozen denoiser with a finished round's EMA weights (a LoRA merged into a copy of the original)."""
        model = copy.deepcopy(self.pipe.denoiser).requires_grad_(False).eval()
        own = part_state(ema_state, "weights")
        if self.config.form == "full":
            model.load_state_dict(own)
            return model
        deltas = {key.replace("/", "."): (own[f"{key}.down"], own[f"{key}.up"])
                  for key in {k.rsplit(".", 1)[0] for k in own}}
        scale = next(iter(self.ema["weights"].values())).scale
        with torch.no_grad():
            for module, weight in lora.merged_weights(model, deltas, scale):
                module.weight.copy_(weight)
        return model

    def _enter_round(self, index: int) -> None:
        """Point the objective at round ``index``: its step count, and the previous round's student as teacher."""
        self.objective.steps = self.schedule[index]
        if index > 0:
            teacher = self._teacher_from(self.rounds[self.schedule[index - 1]])
            self.objective.teacher, self.objective.guidance = denoiser_call(teacher, self.is_dit), None

    def lr_at(self, step: int) -> float:
        from effdiff.zoo.train import warmup_cosine_lr

        c = self.config
        return warmup_cosine_lr(c.lr, step % self.per_round, c.warmup, self.per_round, 0.0, None)

    def step_loss(self) -> torch.Tensor:
        if self.objective.steps != self.schedule[self.round_of(self.step)]:
            self._enter_round(self.round_of(self.step))
        return super().step_loss()

    def after_step(self) -> None:
        super().after_step()
        index = self.round_of(self.step)
        if (self.step + 1) % self.per_round == 0 and index < len(self.schedule) - 1:
            self.rounds[self.schedule[index]] = self._ema_copy()

    def _ema_copy(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.ema.state_dict().items()}

    def _state(self) -> dict[str, Any]:
        return {**super()._state(), "rounds": self.rounds}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.rounds = state["rounds"]
        self.objective.steps = -1  # re-entered (teacher rebuilt from the saved rounds) at the next step

    def train(self) -> None:
        if self.config.max_minutes is not None:
            raise ValueError("progressive: --max-minutes would cut a round short; size it with --iterations")
        super().train()

    def export(self) -> Path:
        """One folder per finished round, ``steps-N``, each with its record; the last round's is the current EMA."""
        if self.step and self.round_of(self.step - 1) == len(self.schedule) - 1:
            self.rounds[self.schedule[-1]] = self._ema_copy()
        base = self.record()
        for steps, weights in self.rounds.items():
            self.write_student(weights, self.out / f"steps-{steps}", {**base, "steps": steps})
        return self.out
