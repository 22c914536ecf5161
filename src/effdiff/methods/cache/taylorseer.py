"""TaylorSeer: between full steps, forecast every attention and MLP output by a Taylor series in time."""

from __future__ import annotations

import math
from typing import Any

import torch

from effdiff.adapters.base import CacheLayer
from effdiff.context import StepContext
from effdiff.methods.cache.base import TAYLORSEER
from effdiff.methods.cache.layers import LayerCache, parts, rebuild
from effdiff.registry import Param

Parts = tuple[torch.Tensor | None, ...]  # a feature as its tensors: a layer's output parts, a block's streams


def taylor_factors(feature: Parts, x: float, old: list[Parts], x_old: float | None, order: int) -> list[Parts]:
    """``[feature, D1, D2, ...]``: divided differences ``D_{i+1} = (D_i - D_i_prev) / (x - x_prev)`` against the
    factors ``old`` taken at ``x_old``, up to ``order``; a part whose shape changed restarts from order 0."""
    factors = [feature]
    if x_old is None or x == x_old:
        return factors
    for i in range(min(order, len(old))):
        pairs = list(zip(factors[i], old[i], strict=False))
        if len(factors[i]) != len(old[i]) or any(
                new is not None and (prev is None or new.shape != prev.shape) for new, prev in pairs):
            break
        factors.append(tuple(None if new is None else (new - prev) / (x - x_old) for new, prev in pairs))
    return factors


def taylor_forecast(factors: list[Parts], dx: float) -> Parts:
    """``sum_i D_i dx^i / i!``, part by part (``None`` stays ``None``)."""
    out = factors[0]
    for i in range(1, len(factors)):
        coeff = dx**i / math.factorial(i)
        out = tuple(None if a is None else a + d * coeff for a, d in zip(out, factors[i], strict=True))
    return out


class TaylorSeer(LayerCache):
    """Forecast each attention and feed-forward output before the block's gate; the block applies this step's.

    Paper: Liu, Zou, Lyu, Chen, Zhang, "From Reusing to Forecasting: Accelerating Diffusion Models with
    TaylorSeers" (arXiv 2503.06923, ICCV 2025). As in the authors' code, the forecast unit is a module's
    output inside a block (FLUX: the joint attention's image and text outputs, the image and text MLPs,
    and a single block's attention+MLP projection), *before* the adaLN gate: the block still computes
    this step's modulation, so the gates, shifts and residual stream are exact and only the expensive
    layers are forecast. Full steps: the first ``warmup`` steps, then every ``interval``-th counting from
    the step after warmup (``(k - warmup - 1) % interval == 0``, the schedule of diffusers'
    ``TaylorSeerCacheConfig``); each updates the layer's finite differences up to ``order``
    (``D_{i+1} = (D_i - D_i_prev) / (x - x_prev)``); cached steps evaluate ``sum_i D_i (x - x_k)^i / i!``.
    ``x`` is the timestep by default (uneven schedules and Heun's two calls per step are handled) or
    the step index (``position=step``, as the authors and diffusers count). ``layers=attention`` forecasts
    attention outputs only and computes the MLPs (diffusers' default identifiers). U-Nets: the transformer
    blocks' layers are forecast and resnets always run; the whole network is never extrapolated
    (``taylorseer-blocks`` forecasts a span of blocks). ``interval=1`` is bit-identical.
    """

    name = "taylorseer"
    examples = {"noop": "taylorseer:interval=1", "skips": "taylorseer:interval=2,warmup=1"}
    paper = TAYLORSEER
    summary = "forecast attention and MLP outputs (before their gates) by Taylor series between full steps"
    params = {
        "interval": Param(int, 5, 1, 1000, help="a full computation every `interval` steps after warmup",
                          search=(2, 8)),
        "order": Param(int, 1, 0, 4, help="Taylor order (0 = plain reuse)", search=(0, 2)),
        "warmup": Param(int, 3, 0, 10000, help="first steps always computed (they seed the derivatives)"),
        "position": Param(str, "timestep", choices=("timestep", "step"), help="the expansion variable"),
        "layers": Param(str, "all", choices=("all", "attention"), help="forecast attention and MLPs, or attention"),
    }

    def cache_layers(self) -> list[CacheLayer]:
        if self.values["layers"] == "attention":
            return [CacheLayer(name, module) for name, module in self.adapter.attention()]
        return super().cache_layers()

    def due(self, ctx: StepContext) -> bool:
        step, warmup = ctx.step_index, self.values["warmup"]
        return step < warmup or (step - warmup - 1) % self.values["interval"] == 0

    def _position(self, ctx: StepContext) -> float:
        if self.values["position"] == "timestep" and ctx.timestep is not None:
            return float(ctx.timestep)
        return float(ctx.step_index)

    def store(self, entry: dict[str, Any], out: Any, ctx: StepContext) -> None:
        x = self._position(ctx)
        entry["factors"] = taylor_factors(parts(out), x, entry.get("factors", []), entry.get("x"),
                                          self.values["order"])
        entry.update(x=x, like=out)

    def serve(self, entry: dict[str, Any], ctx: StepContext) -> Any:
        return rebuild(taylor_forecast(entry["factors"], self._position(ctx) - entry["x"]), entry["like"])
