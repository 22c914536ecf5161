"""Align Your Steps' objective: the KL-divergence upper bound (KLUB) of a step schedule, estimated and minimised.

Sabour, Fidler, Kreis, "Align Your Steps" (arXiv 2404.14507), Sec. 3.2-3.3 and Alg. 1-2, in the paper's
variance-exploding view ``x = x0 + sigma * eps`` with the denoiser ``D(x, sigma)`` (an estimate of ``x0``). A
solver step from ``sigma_hi`` down to ``sigma_lo`` holds ``D`` at ``sigma_hi``; Girsanov's theorem bounds the KL
divergence that step adds by

    KLUB(lo, hi) = 2 * integral_lo^hi  sigma^-3  E || D(x_sigma, sigma) - D(x_hi, hi) ||^2  d sigma,
    x_sigma = x0 + sigma * eps1,   x_hi = x_sigma + sqrt(hi^2 - sigma^2) * eps2,

estimated by importance sampling ``sigma`` from ``sigma^-3 (1/(sigma^2+c^2) - 1/(hi^2+c^2))`` (the integrand
for Gaussian data of scale ``c``, the paper's Eq. 15). Each interior timestep in turn moves to the best of
``candidates`` points between its neighbours (the current one included, so the bound never rises), with the
same random draws for every candidate (common random numbers: the comparison is not drowned in Monte-Carlo
noise). Where the paper draws ``x0`` from the training data, here it is the model's own fine-step samples
(the estimate of ``x0`` at the last call of a fine run): a pipeline carries no dataset. ``c`` is their std.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from effdiff.errors import RecipeError
from effdiff.recording import Call

GRID = 257  # points of the inverse-CDF grid of one interval (log-spaced)
DenoiserFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, sigma per row) -> x0 estimate


@dataclass
class NoiseLevels:
    """``sigma(t) = sqrt((1 - alphabar_t) / alphabar_t)`` of a discrete variance-preserving scheduler."""

    sigmas: torch.Tensor  # (T,) float64, increasing with t

    @classmethod
    def of(cls, scheduler: Any) -> NoiseLevels:
        alphas = getattr(scheduler, "alphas_cumprod", None)
        if alphas is None:
            raise RecipeError(f"ays: {type(scheduler).__name__} has no alphas_cumprod (not a discrete "
                              "variance-preserving scheduler), so its noise levels are unknown")
        alphas = torch.as_tensor(alphas, dtype=torch.float64)
        return cls(((1 - alphas) / alphas).sqrt())

    def sigma(self, t: int) -> float:
        return float(self.sigmas[t])

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous timesteps of ``sigma`` (linear in log sigma between the table's entries)."""
        logs = self.sigmas.log()
        x = sigma.double().log().clamp(float(logs[0]), float(logs[-1]))
        upper = torch.searchsorted(logs, x).clamp(1, len(logs) - 1)
        lo, hi = logs[upper - 1], logs[upper]
        return (upper - 1).double() + (x - lo) / (hi - lo)


class Denoiser:
    """``D(x, sigma)``: the model's ``x0`` estimate on VE-scaled input, conditioned as in one recorded call."""

    def __init__(self, model: nn.Module, call: Call, levels: NoiseLevels, prediction: str) -> None:
        if prediction not in ("epsilon", "v_prediction", "sample"):
            raise RecipeError(f"ays: prediction type {prediction!r} is not supported (epsilon, v_prediction, sample)")
        self.model, self.call, self.levels, self.prediction = model, call, levels, prediction
        self.rows = call.target.shape[0]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``x``: (copies * rows, ...) in VE scale; ``sigma``: one per row."""
        sigma = sigma.to(x.dtype)
        shape = (-1,) + (1,) * (x.ndim - 1)
        scale = (1 + sigma**2).rsqrt().reshape(shape)  # x_t = sqrt(alphabar) * x_ve
        timestep = self.levels.timestep(sigma).to(device=x.device, dtype=torch.float32)
        out = self.call.replay(self.model, (x * scale).to(self.call.target.dtype), timestep).to(x.dtype)
        out = out[:, : x.shape[1]]  # learned-variance models return [prediction, variance] channels
        sigma = sigma.reshape(shape)
        if self.prediction == "epsilon":
            return x - sigma * out
        if self.prediction == "v_prediction":
            return scale**2 * x - sigma * scale * out
        return out


@dataclass
class Draws:
    """The random numbers of one interval estimate, shared by every candidate compared."""

    u: torch.Tensor  # (n,) stratified uniforms in (0, 1)
    eps1: torch.Tensor  # (n * rows, ...)
    eps2: torch.Tensor

    @classmethod
    def make(cls, n: int, like: torch.Tensor, generator: torch.Generator) -> Draws:
        u = (torch.arange(n, dtype=torch.float64) + torch.rand(n, generator=generator, dtype=torch.float64)) / n
        shape = (n * like.shape[0], *like.shape[1:])
        return cls(u, torch.randn(shape, generator=generator, dtype=torch.float64),
                   torch.randn(shape, generator=generator, dtype=torch.float64))


def interval_klub(denoiser: DenoiserFn, x0: torch.Tensor, lo: float, hi: float, c: float, draws: Draws) -> float:
    """Importance-sampled KLUB of one solver step from ``hi`` down to ``lo`` (same unit for every interval)."""
    if hi <= lo:
        return 0.0
    grid = torch.logspace(math.log10(lo), math.log10(hi), GRID, dtype=torch.float64)
    shape_of = (1 / (grid**2 + c**2) - 1 / (hi**2 + c**2)).clamp_min(0)
    density = grid**-3 * shape_of
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64),
                     torch.cumsum((density[1:] + density[:-1]) / 2 * grid.diff(), 0)])
    total = float(cdf[-1])
    if total <= 0:
        return 0.0
    position = torch.searchsorted(cdf / total, draws.u).clamp(1, GRID - 1)
    c0, c1 = cdf[position - 1] / total, cdf[position] / total
    sigma = grid[position - 1] + (draws.u - c0) / (c1 - c0).clamp_min(1e-300) * (grid[position] - grid[position - 1])
    rows = x0.shape[0]
    per_row = sigma.repeat_interleave(rows)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    base = x0.double().repeat(len(sigma), *([1] * (x0.ndim - 1)))
    x_sigma = base + per_row.reshape(shape) * draws.eps1
    x_hi = x_sigma + (hi**2 - per_row**2).clamp_min(0).sqrt().reshape(shape) * draws.eps2
    gap = (denoiser(x_sigma, per_row) - denoiser(x_hi, torch.full_like(per_row, hi))) ** 2
    per_draw = gap.reshape(len(sigma), -1).mean(1)
    weight = (1 / (sigma**2 + c**2) - 1 / (hi**2 + c**2)).clamp_min(1e-300)
    return total * float((2 * per_draw / weight).mean())


def schedule_klub(denoiser: DenoiserFn, x0: torch.Tensor, levels: NoiseLevels, schedule: list[int], c: float,
                  samples: int, seed: int) -> float:
    """The whole schedule's bound (its steps down to ``sigma(0)``), for the record."""
    points = [levels.sigma(t) for t in schedule] + [levels.sigma(0)]
    generator = torch.Generator().manual_seed(seed)
    return sum(interval_klub(denoiser, x0, lo, hi, c, Draws.make(samples, x0, generator))
               for hi, lo in zip(points, points[1:], strict=False))


def candidates_between(levels: NoiseLevels, below: int, above: int, current: int, count: int) -> list[int]:
    """Up to ``count`` integer timesteps spread evenly in log sigma strictly between ``below`` and ``above``
    (``below = -1``: down to t=0), plus ``current``."""
    first = below + 1
    if above - first < 1:
        return [current]
    lo, hi = math.log(levels.sigma(first)), math.log(levels.sigma(above - 1))
    sigmas = torch.tensor([math.exp(lo + (hi - lo) * k / max(count - 1, 1)) for k in range(count)])
    picked = levels.timestep(sigmas).round().long().clamp(first, above - 1).tolist()
    return sorted(set(picked) | {current})


def optimise(denoiser: DenoiserFn, x0: torch.Tensor, levels: NoiseLevels, schedule: list[int], sweeps: int,
             candidates: int, samples: int, seed: int, budget_s: float,
             checkpoint: Callable[[list[int]], float]) -> dict[str, Any]:
    """Coordinate search on the interior timesteps of ``schedule`` (decreasing; the first stays fixed).

    After each sweep ``checkpoint`` scores the schedule (lower is better) and the best-scoring one is kept: the
    paper stops the KLUB descent early on a perceptual check, because the bound's optimum is not the KL's.
    """
    start = time.perf_counter()
    c = float(x0.double().std())
    schedule = list(schedule)
    best_score = first_score = checkpoint(schedule)
    best, history = list(schedule), []
    evaluations = 0
    for sweep in range(sweeps):
        moved = False
        for i in range(1, len(schedule)):
            above, below = schedule[i - 1], schedule[i + 1] if i + 1 < len(schedule) else -1
            low_sigma = levels.sigma(below) if below >= 0 else levels.sigma(0)
            generator = torch.Generator().manual_seed(seed + 1000 * sweep + i)
            upper, lower = Draws.make(samples, x0, generator), Draws.make(samples, x0, generator)
            scores = {}
            for t in candidates_between(levels, below, above, schedule[i], candidates):
                mid = levels.sigma(t)
                scores[t] = (interval_klub(denoiser, x0, mid, levels.sigma(above), c, upper)
                             + interval_klub(denoiser, x0, low_sigma, mid, c, lower))
                evaluations += 1
            choice = min(scores, key=lambda t: (scores[t], t != schedule[i]))
            moved |= choice != schedule[i]
            schedule[i] = choice
            if time.perf_counter() - start > budget_s:
                break
        score = checkpoint(schedule)
        history.append({"sweep": sweep + 1, "timesteps": list(schedule), "checkpoint": score})
        if score < best_score:
            best_score, best = score, list(schedule)
        if not moved or time.perf_counter() - start > budget_s:
            break
    return {"timesteps": best, "loss_default": first_score, "loss_optimised": best_score, "data_scale": c,
            "evaluations": evaluations, "history": history, "seconds": round(time.perf_counter() - start, 2)}
