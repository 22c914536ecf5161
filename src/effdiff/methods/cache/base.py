"""Shared machinery of the feature-caching family: forward patches, per-call state, statistics.

Every cache method patches ``forward`` on *instances* of the denoiser's blocks (or their layers),
never the classes and never the module tree: the state dict, ``named_modules`` and any hooks other
code registered stay exactly as they were, and ``remove`` puts back whatever ``forward`` attribute
was there before (usually none), so the pipeline is restored bit for bit.

State lives in ``ctx.state(self)`` (one dict per CFG branch, emptied at every pipeline call). Within
a branch it is further split into *slots*: the n-th denoiser call of the same solver step gets slot
n, so a pipeline that runs CFG as two separate calls per step keeps one cache per branch instead of
mixing the unconditional features into the conditional ones. Batched CFG (one call carrying both
halves) is one slot.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from effdiff.context import StepContext
from effdiff.registry import Method, Paper, RecipeError

DEEPCACHE = Paper("DeepCache: Accelerating Diffusion Models for Free", "2312.00858", "CVPR 2024")
# FBCache has no paper of its own: it is TeaCache's idea with the first block's residual as the change indicator,
# so it cites TeaCache (the registry requires an arXiv id; the catalogue will list 2411.19108 -> fbcache).
FBCACHE = Paper("Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model (TeaCache), as simplified "
                "by ParaAttention's First Block Cache and cache-dit's DBCache", "2411.19108", "CVPR 2025")
TAYLORSEER = Paper("From Reusing to Forecasting: Accelerating Diffusion Models with TaylorSeers", "2503.06923",
                   "ICCV 2025")
FORA = Paper("FORA: Fast-Forward Caching in Diffusion Transformer Acceleration", "2407.01425", "arXiv 2024")
DELTADIT = Paper("Δ-DiT: A Training-Free Acceleration Method Tailored for Diffusion Transformers", "2406.01125",
                 "arXiv 2024")

Forward = Callable[..., Any]


@dataclass
class CacheStats:
    """What the last pipeline call computed: denoiser calls run in full vs served (partly) from cache."""

    full: int = 0
    cached: int = 0

    @property
    def calls(self) -> int:
        return self.full + self.cached

    @property
    def cached_fraction(self) -> float:
        return self.cached / self.calls if self.calls else 0.0


def first_tensor(out: Any) -> torch.Tensor:
    """The hidden output of a block or model: U-Net down blocks return ``(hidden, skips)``, stock diffusers
    models a ``ModelOutput`` (indexable like a tuple), others a tensor."""
    return out if isinstance(out, torch.Tensor) else out[0]


def feeding_norms(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(norm, layer) pairs of diffusers' ``BasicTransformerBlock``s where the plain LayerNorm's output is read
    by that one attention or feed-forward layer only (through the block's modulation and ``pos_embed``).

    While the layer's output comes from cache the norm's work is thrown away, so a cache method may skip
    it (``CacheMethod.skip_norms``). Adaptive norms (``AdaLayerNormZero`` also yields the gates) and chunked
    feed-forwards (the norm output is split before ``ff``) are left alone.
    """
    from diffusers.models.attention import BasicTransformerBlock

    pairs = []
    for block in model.modules():
        if not isinstance(block, BasicTransformerBlock):
            continue
        if block.norm_type == "ada_norm_single":  # PixArt: norm1 -> attn1, norm2 -> ff; attn2 reads the residual
            wiring = [("norm1", "attn1"), ("norm2", "ff")]
        elif block.norm_type in ("layer_norm", "ada_norm_zero"):
            wiring = [("norm1", "attn1"), ("norm2", "attn2"), ("norm3", "ff")]
        else:
            continue
        for norm_name, layer_name in wiring:
            norm, layer = getattr(block, norm_name, None), getattr(block, layer_name, None)
            if layer_name == "ff" and block._chunk_size is not None:
                continue
            if type(norm) is nn.LayerNorm and layer is not None:
                pairs.append((norm, layer))
    return pairs


def relative_l1(new: torch.Tensor, old: torch.Tensor) -> float:
    """mean|new - old| / mean|old|: the change measure of FBCache and TeaCache."""
    scale = old.abs().mean()
    return float((new - old).abs().mean() / scale) if float(scale) > 0 else float("inf")


class CacheMethod(Method):
    """Base of the cache methods: patch bookkeeping and the per-denoiser-call state switch.

    Subclasses implement ``setup`` (install patches with ``patch``) and ``begin`` (called before every
    denoiser forward with that call's slot state); ``self.current`` is the slot state during a forward.
    """

    family = "cache"
    after = ("solver",)
    # What a cache serves from its store. Block caches (whole blocks, a span of them, or the whole denoiser)
    # and layer caches (attention / feed-forward outputs inside the blocks) touch different things, so one of
    # each stacks (fbcache+fora: FORA's layers run only in the blocks FBCache computes); two of a kind refuse.
    exclusive = ("block outputs",)
    graph_safe = False

    def apply(self, pipe: Any, ctx: StepContext) -> None:
        self._ctx = ctx
        self.stats = CacheStats()
        self.current: dict[str, Any] = {}
        self.setup(pipe)
        self.patches.hook(self.adapter.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
        self.patches.call(ctx.on_reset(self._reset))

    def setup(self, pipe: Any) -> None:
        raise NotImplementedError

    def begin(self, state: dict[str, Any], ctx: StepContext) -> None:
        """Prepare one denoiser call (e.g. decide a static schedule's refresh)."""

    def _reset(self) -> None:
        self.stats = CacheStats()

    @torch.compiler.disable
    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ctx = self._ctx
        branch = ctx.state(self)
        key = (ctx.step_index, ctx.first_order)
        if branch.get("key") == key:
            branch["slot"] += 1
        else:
            branch["key"], branch["slot"] = key, 0
        self.current = branch.setdefault(("slot", branch["slot"]), {})
        self.begin(self.current, ctx)

    def patch(self, module: nn.Module, make: Callable[[Forward], Forward]) -> None:
        """Replace ``module.forward`` on the instance by ``make(current forward)``, through the undo log."""
        self.patches.forward(module, make)

    def skip_norms(self, keys: dict[int, int], served: Served) -> None:
        """Skip each norm of ``feeding_norms`` whose layer (``id`` -> key in ``keys``) is ``served`` from cache
        this call: the norm then returns its input, which only the skipped layer would have read. ``served``
        hears the norm's token shape, which is its layer's: both decide alike when a token method changed it."""
        for norm, layer in feeding_norms(self.adapter.model):
            key = keys.get(id(layer))
            if key is not None:
                self.patch(norm, lambda inner, key=key: self._norm(key, inner, served))

    @staticmethod
    def _norm(key: int, inner: Forward, served: Served) -> Forward:
        def forward(hidden: torch.Tensor) -> torch.Tensor:
            return hidden if served(key, token_shape((hidden,), {})) else inner(hidden)

        return forward

    def count(self, cached: bool) -> None:
        if cached:
            self.stats.cached += 1
        else:
            self.stats.full += 1

    def remove(self) -> None:
        self.current = {}


Served = Callable[[int, "tuple[int, ...] | None"], bool]  # (layer key, its input's token shape) -> reuse it?


def token_shape(args: tuple, kwargs: dict[str, Any]) -> tuple[int, ...] | None:
    """Batch and token dimensions of a layer's input (all but the channels). A token method earlier in the recipe
    (AT-EDM prunes more after its early steps) changes them between steps: an output kept at another count
    cannot be served, so a layer cache compares them before it does."""
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    return tuple(hidden.shape[:-1]) if isinstance(hidden, torch.Tensor) else None


def refuse(method: str, why: str) -> RecipeError:
    return RecipeError(f"{method}: {why}")


def refuse_chunked_feed_forward(method: str, model: nn.Module) -> None:
    """A block that runs ``ff`` in chunks (``set_chunk_feed_forward``) calls it once per chunk, so a cache of
    one output per layer would hand every chunk the last chunk's result: refuse such a model instead."""
    for name, module in model.named_modules():
        if getattr(module, "_chunk_size", None) is not None and getattr(module, "ff", None) is not None:
            raise refuse(method, f"{name} runs its feed-forward in chunks; caching it needs it whole "
                                 f"(call {name}.set_chunk_feed_forward(None) first)")
