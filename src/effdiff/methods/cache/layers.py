"""Layer caches: serve the outputs of the blocks' attention and feed-forward layers at cached steps.

The adapter lists the layers (``Adapter.cache_layers``): every attention and feed-forward layer, and for
FLUX's single blocks the output projection fed by both. Their outputs are what a block gates with the
current step's adaLN modulation and adds to its residual stream, so a served output re-enters the
network through this step's gates and norms; the blocks themselves always run. At a cached step a layer
that only feeds a served one (``CacheLayer.feeds``) returns its last output instead of running, and a
norm that only feeds a served layer is skipped.

Subclasses decide which steps refresh (``due``) and what a served layer returns (``store`` at refreshed
steps, ``serve`` at cached ones): FORA reuses the last output, TaylorSeer forecasts it.
"""

from __future__ import annotations

from typing import Any

import torch

from effdiff.adapters.base import CacheLayer
from effdiff.context import StepContext
from effdiff.methods.cache.base import CacheMethod, Forward, refuse, refuse_chunked_feed_forward, token_shape


class LayerCache(CacheMethod):
    """Base of FORA and TaylorSeer: patches every cache layer (and its feeders) through the undo log."""

    exclusive = ("layer outputs",)

    def cache_layers(self) -> list[CacheLayer]:
        return self.adapter.cache_layers()

    def setup(self, pipe: Any) -> None:
        model = self.adapter.model
        refuse_chunked_feed_forward(self.name, model)
        layers = self.cache_layers()
        if not layers:
            raise refuse(self.name, f"{type(model).__name__} has no attention or feed-forward layers to cache")
        for key, layer in enumerate(layers):
            self.patch(layer.module, lambda inner, key=key: self._layer(key, inner))
            for n, feeder in enumerate(layer.feeds):
                self.patch(feeder, lambda inner, key=key, n=n: self._feeder(key, (key, n), inner))
        self.skip_norms({id(layer.module): key for key, layer in enumerate(layers)}, self._served)
        self.layers = len(layers)

    def due(self, ctx: StepContext) -> bool:
        """Whether this step computes every layer (and refreshes what is stored)."""
        raise NotImplementedError

    def store(self, entry: dict[str, Any], out: Any, ctx: StepContext) -> None:
        """Record a computed output of one layer in its ``entry``."""
        raise NotImplementedError

    def serve(self, entry: dict[str, Any], ctx: StepContext) -> Any:
        """The layer's output at a cached step, from its ``entry``."""
        raise NotImplementedError

    def begin(self, state: dict[str, Any], ctx: StepContext) -> None:
        state["refresh"] = self.due(ctx) or "outputs" not in state
        state.setdefault("outputs", {})
        self.count(not state["refresh"])

    def _served(self, key: int, tokens: tuple[int, ...] | None = None) -> bool:
        """Whether this call reuses layer ``key``: a cached step, an entry, and (when known) the same tokens."""
        state = self.current
        entry = state.get("outputs", {}).get(key)
        return (not state.get("refresh", True) and entry is not None
                and (tokens is None or entry.get("tokens") in (None, tokens)))

    def _layer(self, key: int, inner: Forward) -> Forward:
        def forward(*args: Any, **kwargs: Any) -> Any:
            tokens = token_shape(args, kwargs)
            if self._served(key, tokens):
                return self.serve(self.current["outputs"][key], self._ctx)
            out = inner(*args, **kwargs)
            outputs = self.current.setdefault("outputs", {})
            if outputs.get(key, {}).get("tokens", tokens) != tokens:
                del outputs[key]  # kept at another token count: its history (TaylorSeer's differences) restarts
            entry = outputs.setdefault(key, {})
            entry["tokens"] = tokens
            self.store(entry, out, self._ctx)
            return out

        return forward

    def _feeder(self, key: int, feeder: tuple[int, int], inner: Forward) -> Forward:
        def forward(*args: Any, **kwargs: Any) -> Any:
            last = self.current.setdefault("feeds", {})
            if self._served(key, token_shape(args, kwargs)) and feeder in last:
                return last[feeder]  # only the served layer reads it, and it does not
            out = last[feeder] = inner(*args, **kwargs)
            return out

        return forward


def parts(out: Any) -> tuple[torch.Tensor | None, ...]:
    """A layer's output as a tuple (a joint attention returns ``(image, text)``; the text may be ``None``)."""
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


def rebuild(values: tuple[torch.Tensor | None, ...], like: Any) -> Any:
    """``values`` in the structure of ``like``: a tensor, a tuple, or a named tuple (a block's ``Streams``)."""
    if isinstance(like, torch.Tensor):
        return values[0]
    return type(like)(*values) if hasattr(like, "_fields") else tuple(values)
