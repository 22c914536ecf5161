"""DeepCache: reuse the U-Net's high-level features, recompute only the shallow skip branch."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from effdiff.context import StepContext
from effdiff.methods.cache.base import DEEPCACHE, CacheMethod, Forward, refuse
from effdiff.registry import Param


def refresh_steps(total: int, interval: int, schedule: str, center: float = 0.3, power: float = 2.0) -> set[int]:
    """Steps that run the full U-Net.

    ``uniform``: every ``interval``-th step from the first. ``quadratic``: the same number of refreshes,
    ``ceil(total / interval)``, placed at ``c + sign(u)|u|^power * span`` for ``u`` evenly spread in
    [-1, 1], so they crowd around step ``c = center * (total - 1)`` where the features change fastest and
    thin out towards both ends (the paper's non-uniform 1:N strategy). Step 0 always refreshes.
    """
    if schedule == "uniform" or total <= 1 or interval == 1:
        return {s for s in range(max(total, 1)) if s % interval == 0}
    count = max(1, math.ceil(total / interval))
    c = center * (total - 1)
    steps = {0}
    for k in range(count):
        u = -1.0 + 2.0 * k / (count - 1) if count > 1 else 0.0
        span = c if u < 0 else total - 1 - c
        steps.add(round(c + math.copysign(abs(u) ** power, u) * span))
    return {min(max(s, 0), total - 1) for s in steps}


class DeepCache(CacheMethod):
    """Cache the deep U-Net features and recompute only the shallowest skip branch in between.

    Paper: Ma, Fang, Wang, "DeepCache: Accelerating Diffusion Models for Free" (arXiv 2312.00858,
    CVPR 2024). Skip branches are numbered from the shallow end like the paper and the ``deepcache``
    package: branch 0 is the skip from ``conv_in`` into the last layer of the last up block, branch ``k``
    the ``k``-th skip feature of the down path. On a refresh step the whole U-Net runs and every layer
    deeper than the branch keeps its output; on the other steps those layers return the kept output, so
    only ``conv_in``, the down layers feeding skips ``0..branch``, the up layers consuming them and
    ``conv_out`` run. Patching is per layer (resnet, attention, sampler) so a branch can end inside a
    block, as in the paper. ``interval=1`` refreshes every step: bit-identical to the baseline.
    """

    name = "deepcache"
    examples = {"noop": "deepcache:interval=1", "skips": "deepcache:interval=2"}
    backbones = frozenset({"unet"})
    paper = DEEPCACHE
    summary = "reuse deep U-Net features, recompute the shallow skip branch (static 1:N schedule)"
    params = {
        "interval": Param(int, 3, 1, 1000, help="a full U-Net pass every `interval` steps",
                             search=(2, 8)),
        "branch": Param(int, 0, 0, 64, help="skip branch kept live (0 = shallowest, fastest)",
                           search=(0, 2)),
        "schedule": Param(str, "uniform", choices=("uniform", "quadratic"), help="where the refreshes fall",
                           search=("uniform", "quadratic")),
        "center": Param(float, 0.3, 0.0, 1.0, help="quadratic schedule: step fraction where refreshes crowd"),
    }

    def setup(self, pipe: Any) -> None:
        unet = self.adapter.model
        downs, ups = getattr(unet, "down_blocks", None), getattr(unet, "up_blocks", None)
        if downs is None or ups is None:
            raise refuse(self.name, f"{type(unet).__name__} has no down/up blocks")
        branch = self.values["branch"]
        down_units, down_first, r = [], [], 1  # skip feature 0 is conv_in's output
        for block in downs:
            down_first.append(r)
            attentions = list(getattr(block, "attentions", None) or [])
            for j, resnet in enumerate(block.resnets):
                down_units += [(resnet, r)] + ([(attentions[j], r)] if j < len(attentions) else [])
                r += 1
            if getattr(block, "downsamplers", None):
                down_units += [(sampler, r) for sampler in block.downsamplers]
                r += 1
        skips = r
        if sum(len(block.resnets) for block in ups) != skips:
            raise refuse(self.name, f"{type(unet).__name__}: down path makes {skips} skip features but the up "
                                    "path does not consume exactly that many")
        if branch >= skips:
            raise refuse(self.name, f"branch must be < {skips} (the U-Net's skip features), got {branch}")
        up_units, up_last, c = [], [], skips - 1
        for block in ups:
            attentions = list(getattr(block, "attentions", None) or [])
            for k, resnet in enumerate(block.resnets):
                up_units += [(resnet, c)] + ([(attentions[k], c)] if k < len(attentions) else [])
                c -= 1
            up_last.append(c + 1)
        # whole blocks beyond the branch, plus the mid block (a U-Net may have none: BK-SDM small), return their
        # kept output ...
        mid = getattr(unet, "mid_block", None)
        skipped: list[nn.Module] = [mid] if mid is not None else []
        skipped += [b for b, first in zip(downs, down_first, strict=True) if first > branch]
        skipped += [b for b, last in zip(ups, up_last, strict=True) if last > branch]
        # ... and so do the layers beyond it inside the blocks the branch cuts through.
        ids = {id(m) for m in skipped}
        owners = {id(m): b for b in list(downs) + list(ups) for m in b.modules()}
        for module, index in down_units + up_units:
            if index > branch and id(owners[id(module)]) not in ids:
                skipped.append(module)
        for key, module in enumerate(skipped):
            self.patch(module, lambda inner, key=key: self._cached(key, inner))

    def begin(self, state: dict[str, Any], ctx: StepContext) -> None:
        if "refresh" not in state or state.get("total") != ctx.total_steps:
            v = self.values
            state["total"] = ctx.total_steps
            state["refresh_steps"] = (refresh_steps(ctx.total_steps, v["interval"], v["schedule"], v["center"])
                                      if ctx.total_steps else None)
        steps = state["refresh_steps"]
        due = ctx.step_index % self.values["interval"] == 0 if steps is None else ctx.step_index in steps
        state["refresh"] = due or "outputs" not in state
        state.setdefault("outputs", {})
        self.count(not state["refresh"])

    def _cached(self, key: int, inner: Forward) -> Forward:
        def forward(*args: Any, **kwargs: Any) -> Any:
            state = self.current
            if state.get("refresh", True):
                out = inner(*args, **kwargs)
                state.setdefault("outputs", {})[key] = out
                return out
            return state["outputs"][key]

        return forward
