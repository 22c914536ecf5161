"""Step-schedule search as a tuning step (``effdiff calibrate --method ays``, ``effdiff tune --calibrate ays``):
optimise and cache the Align-Your-Steps schedule of every step count ``ays`` is searched at, so the search then
chooses among ready schedules instead of paying an optimisation per trial."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from effdiff.api import accelerate
from effdiff.eval.fidelity import psnr
from effdiff.methods.solvers.schedule import AlignYourSteps
from effdiff.tune.targets import sample_each


def calibrate(pipe: Any, prompts: list[str], steps: int, guidance: float, seed: int,
              counts: tuple[int, ...] | None = None, cache: str = "", **values: Any) -> list[dict[str, Any]]:
    """Per step count: the optimised timesteps (cached where ``ays`` looks them up) and their PSNR against the
    ``steps``-step baseline on ``prompts``. ``values``: further ``ays`` parameters (its search budget, …) — the
    recipe must name the same ones to find the cached schedule."""
    counts = counts or tuple(AlignYourSteps.params["steps"].search or ())
    reference = sample_each(pipe, prompts, steps, guidance, seed)
    out = []
    for count in counts:
        method = AlignYourSteps(steps=count, cache=cache, **values)
        accelerate(pipe, method)
        try:
            images = sample_each(pipe, prompts, count, guidance, seed)
        finally:
            pipe.effdiff.remove()
        out.append({"steps": count, "timesteps": method.record["timesteps"],
                    "psnr": psnr(images, reference)})
    return out


def run(pipe: Any, model: str, prompts: list[str], steps: int, guidance: float, target_psnr: float, seed: int,
        out: Path | None) -> str:
    """The CLI's entry: one line per step count (``target_psnr`` is reported against, not searched)."""
    rows = calibrate(pipe, prompts, steps, guidance, seed, cache=str(out) if out else "")
    return "\n".join(f"{model}: ays schedule for {r['steps']} steps {r['timesteps']} (PSNR {r['psnr']:.2f} dB vs "
                     f"{steps} DDIM steps{'' if r['psnr'] >= target_psnr else ', below the target'})" for r in rows)
