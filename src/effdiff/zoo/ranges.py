"""The ranges a training run's numeric settings must lie in, checked before anything is loaded.

A negative learning rate or loss weight, an EMA decay of 1, a caption dropout of 2: each of these is accepted by the
optimiser and the loss and gives a run that trains the wrong way (or not at all) for the whole budget, and its
record would not say why. ``effdiff zoo train``, ``effdiff distill`` and ``effdiff compress`` share these rules
by field name, so a setting means the same thing in all three and each is refused with its flag's name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

Rule = tuple[Callable[[float], bool], str]

_POSITIVE: Rule = (lambda v: v > 0, "> 0")
_COUNT: Rule = (lambda v: v >= 1, "≥ 1")
_NON_NEGATIVE: Rule = (lambda v: v >= 0, "≥ 0")
_DECAY: Rule = (lambda v: 0 <= v < 1, "in [0, 1)")
_PROBABILITY: Rule = (lambda v: 0 <= v <= 1, "in [0, 1]")
_OPEN_FRACTION: Rule = (lambda v: 0 < v < 1, "in (0, 1)")
_SHARE: Rule = (lambda v: 0 < v <= 1, "in (0, 1]")

RULES: dict[str, Rule] = {
    **dict.fromkeys(("lr", "critic_lr", "max_minutes"), _POSITIVE),
    **dict.fromkeys(("steps", "iterations", "batch_size", "checkpoint_every", "stride", "rank", "couplings",
                     "coupling_steps", "critic_updates", "ddim_steps", "start_steps", "eval_steps"), _COUNT),
    **dict.fromkeys(("warmup", "mask_iterations", "teacher_weight", "feature_weight", "guidance_weight",
                     "regression_weight", "gan_weight", "gan_critic_weight", "guidance", "w_min"), _NON_NEGATIVE),
    **dict.fromkeys(("ema_decay", "target_decay"), _DECAY),
    "caption_dropout": _PROBABILITY,
    "threshold": _OPEN_FRACTION,
    "reflow_share": _SHARE,  # 1: reflow only, no one-step phase
}


def refuse_out_of_range(config: Any) -> None:
    """Raise ValueError naming the first of ``config``'s (a dataclass) settings outside its range, by its
    command-line flag; settings left at None (no budget) pass."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        rule = RULES.get(field.name)
        if rule is None or value is None or isinstance(value, bool):
            continue
        holds, wanted = rule
        if not holds(value):
            raise ValueError(f"--{field.name.replace('_', '-')} must be {wanted}, got {value}")
    low, high = getattr(config, "w_min", None), getattr(config, "w_max", None)
    if low is not None and high is not None and high <= low:
        raise ValueError(f"--w-max must be above --w-min, got {high} and {low}")
