"""Quality targets of a tuning run, and the per-prompt samples they are measured on."""

from __future__ import annotations

import re
from typing import Any

import torch

from effdiff.methods.solvers.schedule import sample


def parse_target(text: str) -> tuple[str, float]:
    """``"psnr>=30"`` -> ``("psnr", 30.0)``; anything else is a ValueError saying what is accepted."""
    match = re.fullmatch(r"\s*([a-z]+)\s*(>=|<=)\s*([0-9]*\.?[0-9]+)\s*", text.lower())
    if not match:
        raise ValueError(f"--target must look like psnr>=30, got {text!r}")
    metric, op, value = match.group(1), match.group(2), float(match.group(3))
    if metric == "fid":
        raise ValueError("--target fid<=X is not supported yet; use psnr>=X (dB vs the baseline images)")
    if metric != "psnr" or op != ">=":
        raise ValueError(f"--target must be psnr>=X (dB vs the baseline images), got {text!r}")
    return metric, value


def sample_each(pipe: Any, prompts: list[str], steps: int, guidance: float, seed: int) -> torch.Tensor:
    """One call per prompt (batch-1 latency, as served), same noise per prompt index."""
    return torch.cat([sample(pipe, [prompt], steps, guidance, seed + i) for i, prompt in enumerate(prompts)])
