"""Block-segment caching for U-Nets and DiTs alike: skip a span of blocks, estimate what it would add.

The adapter gives every denoiser as an ordered list of blocks (U-Net: down..., mid, up...; DiT: the
transformer blocks). A method picks a *segment* ``[lo, hi)`` of that list; the blocks before it (the
"front") and after it (the "back") always run. On a step the method decides to skip, the segment's
blocks are not run and its exit is replaced by an estimate:

- *residual form* (the segment's output has its input's shape: any DiT segment, the whole U-Net from
  ``conv_in`` to the last up block, or the mid block alone): ``exit = entry + R`` where ``R`` is the
  segment's residual ``exit - entry`` cached (FBCache, Δ-DiT) or forecast (TaylorSeer);
- *feature form* (a U-Net segment cut at the skip branch ``front``: the deep feature entering the
  first back up block has another shape): the feature itself is cached or forecast, as in DeepCache.

On the U-Net the segment must be closed under the long skips (``front`` down blocks and their mirror
up blocks run), so a skipped down block's skip features are only ever consumed by skipped up blocks;
skipped U-Net blocks return their last computed output so the skip tuples keep their lengths. DiT
blocks inside the segment return their input unchanged (free) and the exit block adds the estimate.

Everything is kept as ``Streams``: on an MMDiT (FLUX, SD3) a segment's entry, residual and forecast
carry the text stream beside the image stream, so the cached span returns both, in the block's own
output layout (the adapter's ``BlockRef.pack``).
"""

from __future__ import annotations

from typing import Any

from effdiff.adapters import Streams
from effdiff.context import StepContext
from effdiff.methods.cache.base import CacheMethod, Forward, refuse


class SegmentCache(CacheMethod):
    """Base of FBCache, TaylorSeer and Δ-DiT: subclasses choose the segment and when/what to estimate.

    Applied after token methods, whatever the written order: a skipped segment then bypasses their block
    patches as a whole. Inside them it would not: AT-EDM's span (prune in its first block, recover in its
    last) would see blocks that returned their input unchanged and no ranking, and hand the model's last
    block a pruned token set (found by ``effdiff tune``: ``fbcache+atedm`` failed, ``atedm+fbcache`` ran)."""

    after = ("solver", "tokens")

    def setup(self, pipe: Any) -> None:
        self.refs = self.adapter.blocks()
        if not self.refs:
            raise refuse(self.name, f"{type(self.adapter.model).__name__} has no blocks to cache")
        self.unet = self.adapter.kind == "unet"
        if self.unet:
            roles = [ref.role for ref in self.refs]
            downs, ups = roles.count("down"), roles.count("up")
            if "mid" not in roles or downs != ups:
                raise refuse(self.name, f"U-Net {type(self.adapter.model).__name__} needs a mid block and as many "
                                        "up as down blocks")
            self.depth = downs
        self.check_params()
        for i, ref in enumerate(self.refs):
            self.patch(ref.module, lambda inner, i=i: self._block(i, inner))

    # --- what subclasses define -----------------------------------------------------------------
    def check_params(self) -> None:
        """Refuse parameters the backbone cannot honour (called once, with ``self.refs`` known)."""

    def segment(self, state: dict[str, Any], ctx: StepContext) -> tuple[int, int]:
        """The ``[lo, hi)`` block span for this denoiser call."""
        raise NotImplementedError

    def skip(self, state: dict[str, Any], ctx: StepContext, forward: dict[str, Any]) -> bool:
        """Decide, at the segment's entry, whether to skip it this call (only honoured once a feature is kept)."""
        raise NotImplementedError

    def store(self, state: dict[str, Any], ctx: StepContext, feature: Streams) -> None:
        """Keep the segment's residual (or deep feature) after a full computation."""
        state["feature"] = feature

    def estimate(self, state: dict[str, Any], ctx: StepContext) -> Streams:
        """The residual (or feature) to use on a skipped call."""
        return state["feature"]

    # --- helpers --------------------------------------------------------------------------------
    def unet_segment(self, front: int) -> tuple[int, int]:
        """U-Net segment leaving ``front`` down blocks and their mirror up blocks live."""
        return front, len(self.refs) - front

    def begin(self, state: dict[str, Any], ctx: StepContext) -> None:
        lo, hi = self.segment(state, ctx)
        if state.get("span") != (lo, hi):  # a cached residual belongs to one span
            state.pop("feature", None)
            state["span"] = (lo, hi)
            self.on_new_span(state)
        state["fwd"] = {"lo": lo, "hi": hi, "skip": False}
        state.setdefault("outputs", {})

    def on_new_span(self, state: dict[str, Any]) -> None:
        """The segment moved (Δ-DiT's stages): forget what belonged to the old one."""

    def _block(self, i: int, inner: Forward) -> Forward:
        ref = self.refs[i]
        unet_pattern = ref.pattern.startswith("unet")

        def forward(*args: Any, **kwargs: Any) -> Any:
            state = self.current
            fwd = state["fwd"]
            lo, hi = fwd["lo"], fwd["hi"]
            if i == 0:
                fwd["first_in"] = ref.hidden_in(args, kwargs)
            if i < lo or i >= hi:
                out = inner(*args, **kwargs)
                if i == lo - 1:
                    fwd["front_out"] = ref.hidden_out(out)
                return out
            if i == lo:
                fwd["entry"] = entry = ref.streams_in(args, kwargs)
                if state.setdefault("entry_shapes", shapes(entry)) != shapes(entry):
                    restart(state, shapes(entry))
                fwd["skip"] = self.skip(state, self._ctx, fwd) and "feature" in state
                self.count(fwd["skip"])
            if not fwd["skip"]:
                out = inner(*args, **kwargs)
                if i == hi - 1:
                    entry, exit_ = fwd["entry"], ref.streams_out(out)
                    state["residual"] = residual = exit_.same_shapes(entry)
                    self.store(state, self._ctx, exit_ - entry if residual else exit_)
                elif unet_pattern:
                    state["outputs"][i] = out
                return out
            if i < hi - 1:
                return state["outputs"][i] if unet_pattern else ref.pack(ref.streams_in(args, kwargs))
            estimate = self.estimate(state, self._ctx)
            return ref.pack(fwd["entry"] + estimate if state["residual"] else estimate)

        return forward


def shapes(streams: Any) -> tuple[tuple[int, ...] | None, ...]:
    """The shapes of a block's input streams (None for an absent text stream)."""
    return tuple(None if t is None else tuple(t.shape) for t in streams)


def restart(state: dict[str, Any], entry_shapes: tuple[tuple[int, ...] | None, ...]) -> None:
    """Forget every kept feature and change statistic: a token method earlier in the recipe (AT-EDM prunes more
    after its early steps) changed the segment's token count, and history of another shape cannot be served or
    compared with. The segment carries on as at its first step."""
    for key in [k for k in state if k not in ("span", "fwd")]:
        del state[key]
    state["outputs"], state["entry_shapes"] = {}, entry_shapes
