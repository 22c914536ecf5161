"""Segment caches for U-Nets and DiTs: First-Block Cache, TaylorSeer over blocks, Δ-DiT."""

from __future__ import annotations

import math
from typing import Any

from effdiff.adapters import Streams
from effdiff.context import StepContext
from effdiff.methods.cache.base import DELTADIT, FBCACHE, TAYLORSEER, refuse, relative_l1
from effdiff.methods.cache.layers import parts, rebuild
from effdiff.methods.cache.segment import SegmentCache
from effdiff.methods.cache.taylorseer import taylor_factors, taylor_forecast
from effdiff.registry import Param


class _FrontBack(SegmentCache):
    """A fixed segment given by ``front`` (and, on DiTs, ``back``) block counts."""

    min_front = 0

    def check_params(self) -> None:
        front, back, n = self.values["front"], self.values["back"], len(self.refs)
        if front < self.min_front:
            raise refuse(self.name, f"front must be >= {self.min_front}, got {front}")
        if self.unet:
            if back:
                raise refuse(self.name, "back applies to DiTs; on a U-Net the back blocks are the mirror of the "
                                        "front down blocks")
            if front > self.depth:
                raise refuse(self.name, f"front must be <= {self.depth} (the U-Net's down blocks), got {front}")
        elif front + back >= n:
            raise refuse(self.name, f"front + back must leave at least one of the {n} blocks to cache, "
                                    f"got {front} + {back}")

    def segment(self, state: dict[str, Any], ctx: StepContext) -> tuple[int, int]:
        front = self.values["front"]
        return self.unet_segment(front) if self.unet else (front, len(self.refs) - self.values["back"])


_FRONT_HELP = "blocks always run before the cached span (U-Net: down blocks kept live with their mirrors)"
_BACK_HELP = "DiT only: blocks always run after the cached span (cache-dit's Bn)"


class FirstBlockCache(_FrontBack):
    """Run the first block(s); skip the rest while their input barely changes, adding the cached residual.

    After ParaAttention's First Block Cache and cache-dit's DBCache (``front``/``back`` = Fn/Bn), which
    apply TeaCache's idea (Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion
    Model", arXiv 2411.19108, CVPR 2025) with the first block's residual as the change indicator: if
    mean|r - r_ref| / mean|r_ref| < ``threshold``, where ``r_ref`` is that residual at the last fully
    computed step, the remaining blocks are skipped. DiT: the residual of the skipped blocks is cached
    and added to the current hidden state. U-Net (which no peer supports): the front down blocks and
    their mirror up blocks run, the deep feature in between is reused (a dynamic DeepCache), and the
    indicator is the front's output. ``threshold=0`` never skips: bit-identical to the baseline.
    """

    name = "fbcache"
    examples = {"noop": "fbcache:threshold=0", "skips": "fbcache:threshold=10"}
    paper = FBCACHE
    min_front = 1
    summary = "dynamic: skip the blocks after the first while its residual barely changes (U-Net and DiT)"
    params = {
        "threshold": Param(float, 0.1, 0.0, 10.0, help="relative L1 change of the first block's residual",
                           search=(0.02, 0.6)),
        "front": Param(int, 1, 1, 256, help=_FRONT_HELP),
        "back": Param(int, 0, 0, 256, help=_BACK_HELP),
        "warmup": Param(int, 1, 0, 10000, help="first steps always computed"),
        "max_skip": Param(int, 0, 0, 10000, help="most consecutive skipped steps (0: no limit)", search=(0, 4)),
    }

    def skip(self, state: dict[str, Any], ctx: StepContext, forward: dict[str, Any]) -> bool:
        out, first = forward["front_out"], forward["first_in"]
        signal = out - first if out.shape == first.shape else out
        previous = state.get("signal")
        v = self.values
        change = relative_l1(signal, previous) if previous is not None else math.inf
        self.changes.append(change)
        allowed = ctx.step_index >= v["warmup"] and (not v["max_skip"] or state.get("run", 0) < v["max_skip"])
        if allowed and change < v["threshold"] and "feature" in state:
            state["run"] = state.get("run", 0) + 1
            return True
        state["signal"], state["run"] = signal, 0
        return False

    def _reset(self) -> None:
        super()._reset()
        self.changes: list[float] = []

    def setup(self, pipe: Any) -> None:
        self.changes = []
        super().setup(pipe)


class TaylorSeerBlocks(_FrontBack):
    """Full computation every ``interval`` steps; in between, forecast a span of blocks by Taylor series.

    After TaylorSeer (Liu et al., "From Reusing to Forecasting: Accelerating Diffusion Models with
    TaylorSeers", arXiv 2503.06923, ICCV 2025) applied at block level, as cache-dit's DBCache with its
    TaylorSeer calibrator (Fn/Bn = ``front``/``back``) and diffusers' "lite" mode (``front=0``) do; the
    paper's own unit, each module's output before its gate, is ``taylorseer``. At each full step the
    segment's residual (DiT; the whole U-Net with ``front=0``) or deep feature (U-Net, ``front>0``) updates
    finite-difference derivatives up to ``order`` (in the timestep, so Heun's two calls and uneven
    schedules are handled); skipped steps evaluate ``sum_i D_i (t - t_k)^i / i!``. The forecast is linear
    in the features, so forecasting the span's total residual equals forecasting every block's. ``front``
    defaults to 1 (cache-dit's F1B0; on a U-Net the outermost down block and its mirror always run, as in
    DeepCache), so the whole network is not extrapolated unless asked.
    ``interval=1`` computes every step: bit-identical.
    """

    name = "taylorseer-blocks"
    examples = {"noop": "taylorseer-blocks:interval=1", "skips": "taylorseer-blocks:interval=2,warmup=1"}
    paper = TAYLORSEER
    summary = "forecast a span of blocks' residual by Taylor series (cache-dit's Fn/Bn + TaylorSeer)"
    params = {
        "interval": Param(int, 4, 1, 1000, help="a full computation every `interval` steps", search=(2, 8)),
        "order": Param(int, 1, 0, 4, help="Taylor order (0 = plain reuse)", search=(0, 2)),
        "warmup": Param(int, 2, 0, 10000, help="first steps always computed (they seed the derivatives)"),
        "front": Param(int, 1, 0, 256, help=_FRONT_HELP),
        "back": Param(int, 0, 0, 256, help=_BACK_HELP),
    }

    def skip(self, state: dict[str, Any], ctx: StepContext, forward: dict[str, Any]) -> bool:
        step = ctx.step_index
        return step >= self.values["warmup"] and step % self.values["interval"] != 0

    def _position(self, ctx: StepContext) -> float:
        return float(ctx.timestep) if ctx.timestep is not None else float(ctx.step_index)

    def store(self, state: dict[str, Any], ctx: StepContext, feature: Streams) -> None:
        t = self._position(ctx)
        state["derivatives"] = taylor_factors(parts(feature), t, state.get("derivatives", []), state.get("t"),
                                              self.values["order"])
        state["t"], state["feature"] = t, feature

    def estimate(self, state: dict[str, Any], ctx: StepContext) -> Streams:
        return rebuild(taylor_forecast(state["derivatives"], self._position(ctx) - state["t"]), state["feature"])


class DeltaDiT(SegmentCache):
    """Stage-dependent block caching: rear blocks early in sampling, front blocks late.

    Paper: Chen et al., "Δ-DiT: A Training-Free Acceleration Method Tailored for Diffusion Transformers"
    (arXiv 2406.01125, 2024). Early steps shape the outline, which the rear blocks barely change; late
    steps refine details, which the front blocks barely change. So before the ``gate`` (a fraction of
    the steps) the last ``blocks`` blocks, after it the first ``blocks`` blocks, form the cached span; its
    deviation (residual, the paper's Δ-Cache) is refreshed every ``interval`` steps and added to the
    current input otherwise. DiT only: a U-Net's blocks are not a residual stack.
    """

    name = "deltadit"
    examples = {"noop": "deltadit:interval=1", "skips": "deltadit:interval=2"}
    backbones = frozenset({"dit"})
    paper = DELTADIT
    summary = "cache the deviation of rear DiT blocks early, front blocks late"
    params = {
        "interval": Param(int, 2, 1, 1000, help="refresh the cached deviation every `interval` steps",
                             search=(2, 6)),
        "blocks": Param(int, 0, 0, 256, help="blocks in the cached span (0: half the blocks)"),
        "gate": Param(float, 0.5, 0.0, 1.0, help="fraction of the steps before switching rear -> front"),
    }

    def check_params(self) -> None:
        n = len(self.refs)
        if self.values["blocks"] >= n:
            raise refuse(self.name, f"blocks must be < {n} (the model's blocks), got {self.values['blocks']}")
        self.span = self.values["blocks"] or max(1, n // 2)

    def segment(self, state: dict[str, Any], ctx: StepContext) -> tuple[int, int]:
        n = len(self.refs)
        early = ctx.total_steps == 0 or ctx.step_index < self.values["gate"] * ctx.total_steps
        return (n - self.span, n) if early else (0, self.span)

    def skip(self, state: dict[str, Any], ctx: StepContext, forward: dict[str, Any]) -> bool:
        return ctx.step_index % self.values["interval"] != 0
