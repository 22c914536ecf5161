"""FORA: reuse every attention and MLP output of the transformer blocks for N-1 of every N steps."""

from __future__ import annotations

from typing import Any

from effdiff.context import StepContext
from effdiff.methods.cache.base import FORA, CacheMethod, Forward, refuse, refuse_chunked_feed_forward
from effdiff.registry import Param


class Fora(CacheMethod):
    """Static caching of the attention and feed-forward layers inside the transformer blocks.

    Paper: Selvaraju et al., "FORA: Fast-Forward Caching in Diffusion Transformer Acceleration"
    (arXiv 2407.01425, 2024). Every ``interval``-th step runs fully and keeps the output of each
    attention (self and cross) and feed-forward layer; the steps in between reuse them, so a block only
    runs its modulation and residual additions (the LayerNorms that feed only a reused layer are skipped
    too). It needs no residual structure of the backbone, so it runs on a U-Net's transformer blocks as
    well as on a DiT's. ``interval=1``: bit-identical.
    """

    name = "fora"
    exclusive = ("layer outputs",)
    examples = {"noop": "fora:interval=1", "skips": "fora:interval=2"}
    paper = FORA
    summary = "reuse attention and MLP outputs every N steps (DiT blocks and U-Net transformer blocks)"
    params = {
        "interval": Param(int, 3, 1, 1000, help="a full computation every `interval` steps"),
        "warmup": Param(int, 0, 0, 10000, help="first steps always computed"),
    }

    def setup(self, pipe: Any) -> None:
        from diffusers.models.attention import FeedForward

        model = self.adapter.model
        refuse_chunked_feed_forward(self.name, model)
        layers = [m for _, m in self.adapter.attention()]
        layers += [m for m in model.modules() if isinstance(m, FeedForward)]
        if not layers:
            raise refuse(self.name, f"{type(model).__name__} has no attention or feed-forward layers to cache")
        for key, layer in enumerate(layers):
            self.patch(layer, lambda inner, key=key: self._layer(key, inner))
        self.skip_norms({id(layer): key for key, layer in enumerate(layers)}, self._served)
        self.layers = len(layers)

    def _served(self, key: int) -> bool:
        state = self.current
        return not state.get("refresh", True) and key in state.get("outputs", {})

    def begin(self, state: dict[str, Any], ctx: StepContext) -> None:
        step = ctx.step_index
        due = step < self.values["warmup"] or step % self.values["interval"] == 0
        state["refresh"] = due or "outputs" not in state
        state.setdefault("outputs", {})
        self.count(not state["refresh"])

    def _layer(self, key: int, inner: Forward) -> Forward:
        def forward(*args: Any, **kwargs: Any) -> Any:
            state = self.current
            if state.get("refresh", True) or key not in state["outputs"]:
                out = inner(*args, **kwargs)
                state.setdefault("outputs", {})[key] = out
                return out
            return state["outputs"][key]

        return forward
