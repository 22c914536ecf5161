"""Quality targets of a tuning run, and the per-prompt samples they are measured on.

A target is ``METRIC OP VALUE``: ``psnr>=30`` (dB against the baseline's images), ``ssim>=0.9``, ``fid<=+10%``,
``kid<=+0.001``, ``acc>=99`` / ``acc>=-1``. A leading sign makes it relative to the baseline measured in the same
run: ``+10%`` is 10 % above the baseline's value, ``-1`` is one unit below it (accuracy in percentage points). No
sign: an absolute bound (accuracy in percent). PSNR and SSIM are already comparisons with the baseline, so they
take absolute bounds only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from effdiff.methods.solvers.schedule import sample

METRICS = {"fid": "fid", "kid": "kid", "acc": "prompt_accuracy", "accuracy": "prompt_accuracy",
           "psnr": "psnr", "ssim": "ssim"}
LOWER_IS_BETTER = frozenset({"fid", "kid"})
_PATTERN = re.compile(r"\s*([a-z]+)\s*(>=|<=)\s*([+-])?\s*([0-9]*\.?[0-9]+)\s*(%?)\s*")


@dataclass(frozen=True)
class Goal:
    """One parsed target: the stored metric it bounds and how the bound follows from the baseline."""

    text: str
    metric: str  # the bench's metric key (``prompt_accuracy`` for ``acc``)
    op: str  # ">=" or "<="
    value: float  # in the metric's stored unit (accuracy as a fraction)
    relative: str  # "": absolute; "%": percent of the baseline's value; "delta": added to the baseline's value

    def bound(self, baseline: float | None) -> float:
        """The number a recipe's metric must not cross, given the baseline's value in the same run."""
        if not self.relative:
            return self.value
        if baseline is None:
            raise ValueError(f"target {self.text!r} is relative to the baseline, whose {self.metric} is unknown")
        return baseline * (1 + self.value / 100) if self.relative == "%" else baseline + self.value

    def met(self, value: float | None, baseline: float | None) -> bool:
        if value is None or value != value:  # missing or NaN: not shown to meet anything
            return False
        bound = self.bound(baseline)
        return value <= bound if self.op == "<=" else value >= bound

    def margin(self, value: float, baseline: float | None) -> float:
        """How far inside the bound (positive) or outside (negative), in the metric's unit."""
        bound = self.bound(baseline)
        return bound - value if self.op == "<=" else value - bound


def parse_goal(text: str) -> Goal:
    """``"fid<=+10%"`` -> a Goal; anything else is a ValueError saying what is accepted."""
    match = _PATTERN.fullmatch(text.lower())
    if not match or match.group(1) not in METRICS:
        raise ValueError(f"--target must look like psnr>=30, fid<=+10% or acc>=-1 (metrics: "
                         f"{', '.join(sorted(set(METRICS) - {'accuracy'}))}), got {text!r}")
    name, op, sign, number, percent = match.groups()
    metric, value = METRICS[name], float(number) * (-1 if sign == "-" else 1)
    expected = "<=" if name in LOWER_IS_BETTER else ">="
    if op != expected:
        raise ValueError(f"{name} is {'lower' if expected == '<=' else 'higher'} for better images: write "
                         f"{name}{expected}…, got {text!r}")
    if metric in ("psnr", "ssim") and sign:
        raise ValueError(f"{name} already compares with the baseline's images: give an absolute bound "
                         f"({name}>=30 for PSNR in dB, ssim>=0.9), got {text!r}")
    if sign:
        relative = "%" if percent else "delta"
        if metric == "prompt_accuracy" and not percent:
            value /= 100  # percentage points
    else:
        if percent and metric != "prompt_accuracy":
            raise ValueError(f"a percentage of {name} needs a sign to say it is relative to the baseline "
                             f"({name}{op}+10%), got {text!r}")
        relative = ""
        if metric == "prompt_accuracy":
            value /= 100  # accuracy bounds are given in percent
    return Goal(text.strip(), metric, op, value, relative)


def parse_target(text: str) -> tuple[str, float]:
    """``"psnr>=30"`` -> ``("psnr", 30.0)``: the one target a method's calibration (``effdiff calibrate``) takes."""
    goal = parse_goal(text)
    if goal.metric != "psnr":
        raise ValueError(f"--target of effdiff calibrate must be psnr>=X (dB vs the baseline images), got {text!r}; "
                         "FID, KID and accuracy targets are for effdiff tune")
    return goal.metric, goal.value


def sample_each(pipe: Any, prompts: list[str], steps: int, guidance: float, seed: int) -> torch.Tensor:
    """One call per prompt (batch-1 latency, as served), same noise per prompt index."""
    return torch.cat([sample(pipe, [prompt], steps, guidance, seed + i) for i, prompt in enumerate(prompts)])
