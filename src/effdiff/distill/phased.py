"""A distillation run in phases, each with its own objective, learning-rate cycle and exported student.

Progressive distillation (one phase per halving of the steps) and rectified flow (reflow, then one step) both
train one set of weights through a fixed sequence of objectives, where a later phase learns from what an earlier
one left behind. What they share lives here: where each phase ends (fixed by ``--iterations``, so ``--resume``
cannot move it and ``--max-minutes`` is refused), a warm-up and cosine decay per phase, the EMA student kept at
each phase's end (checkpointed, and exported as ``<out>/<phase name>``), and a frozen copy of a kept student to
serve as the next phase's teacher.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from effdiff.distill import lora
from effdiff.distill.trainer import DistillConfig, DistillTrainer, part_state


class PhasedTrainer(DistillTrainer):
    """A subclass names its phases and their lengths (``phase_plan``) and points the objective at a phase in
    ``enter_phase``; a phase is entered on its first step, and again after a resume."""

    resumable_changes = ("device", "checkpoint_every")

    def __init__(self, config: DistillConfig, run: Path, out: Path, pipe: Any = None) -> None:
        self.names, lengths = zip(*self.phase_plan(config), strict=True)
        self.ends = [sum(lengths[:i + 1]) for i in range(len(lengths))]
        self.kept: dict[str, dict[str, torch.Tensor]] = {}  # phase name -> EMA state at its end
        self.current = -1  # the phase the objective points at; -1: none yet (or re-entered after a resume)
        super().__init__(config, run, out, pipe)

    def phase_plan(self, config: DistillConfig) -> list[tuple[str, int]]:
        """(name, iterations) of every phase, in order; the iterations add up to ``config.iterations``."""
        raise NotImplementedError

    def enter_phase(self, index: int) -> None:
        """Point the objective at phase ``index`` (its predecessors' students are in ``kept``)."""
        raise NotImplementedError

    def phase_of(self, step: int) -> int:
        return next((i for i, end in enumerate(self.ends) if step < end), len(self.ends) - 1)

    def phase_start(self, index: int) -> int:
        return self.ends[index - 1] if index else 0

    def lr_at(self, step: int) -> float:
        from effdiff.zoo.train import warmup_cosine_lr

        index = self.phase_of(step)
        start = self.phase_start(index)
        return warmup_cosine_lr(self.config.lr, step - start, self.config.warmup, self.ends[index] - start, 0.0,
                                None)

    def frozen_copy(self, ema_state: dict[str, torch.Tensor]) -> torch.nn.Module:
        """A frozen denoiser with a kept student's weights (a LoRA merged into a copy of the original)."""
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

    def follow_phase(self) -> None:
        """Enter the phase of the coming step if the objective is not there yet."""
        index = self.phase_of(self.step)
        if index != self.current:
            self.enter_phase(index)
            self.current = index

    def step_loss(self) -> torch.Tensor:
        self.follow_phase()
        return super().step_loss()

    def after_step(self) -> None:
        super().after_step()
        index = self.phase_of(self.step)
        if self.step + 1 == self.ends[index] and index < len(self.ends) - 1:
            self.kept[self.names[index]] = self._ema_copy()

    def _ema_copy(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.ema.state_dict().items()}

    def _state(self) -> dict[str, Any]:
        return {**super()._state(), "kept": self.kept}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.kept = state["kept"]
        self.current = -1

    def train(self) -> None:
        if self.config.max_minutes is not None:
            raise ValueError(f"{self.config.method}: --max-minutes would cut a phase short; size it with "
                             "--iterations")
        super().train()

    def phase_record(self, name: str) -> dict[str, Any]:
        """What a phase's student adds to the run's record."""
        return {"phase": name}

    def export(self) -> Path:
        """One folder per finished phase, each with its record; the last phase's student is the current EMA."""
        if self.step and self.phase_of(self.step - 1) == len(self.ends) - 1:
            self.kept[self.names[-1]] = self._ema_copy()
        base = self.record()
        for name, weights in self.kept.items():
            self.write_student(weights, self.out / name, {**base, **self.phase_record(name)})
        return self.out
