"""Shared machinery of the token family: which transformer blocks to touch and their token grids.

Token methods work on diffusers' ``BasicTransformerBlock``, the block of SD U-Nets (inside each
``Transformer2DModel``), PixArt and DiT alike. They patch ``forward`` on the *instances* of the block
and of its ``attn1`` / ``attn2`` / ``ff`` (the ``CacheMethod`` bookkeeping: ``remove`` restores bit for
bit) and leave the block's own code, norms and gates untouched, so every norm type the block supports
keeps working.

A block's token grid is known from the denoiser's input (recorded by the pre-hook) and the block's
*stride*: a U-Net block at downsample ``d`` sees ``ceil(H/d) × ceil(W/d)`` tokens (stride-2 convs with
padding 1 round up), a DiT block sees ``H/p × W/p`` for patch size ``p``. ``max_downsample`` counts U-Net
levels like ToMe for SD (1 = full latent resolution); every DiT block is at level 1.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from effdiff.adapters.base import hidden_of
from effdiff.methods.cache.base import CacheMethod, refuse
from effdiff.methods.tokens.maps import TokenMap

Builder = Callable[[torch.Tensor, dict], "TokenMap | bool"]


@dataclass
class TokenBlock:
    """A transformer block a token method may reduce, with where its tokens sit on the latent grid."""

    name: str
    module: nn.Module
    stride: int  # latent pixels per token side
    level: int  # U-Net downsample factor (1 for every DiT block)


def _transformer_blocks(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    from diffusers.models.attention import BasicTransformerBlock

    if isinstance(module, BasicTransformerBlock):
        return [(prefix, module)]
    return [(f"{prefix}.{n}", m) for n, m in module.named_modules() if isinstance(m, BasicTransformerBlock)]


def token_blocks(adapter: Any) -> list[TokenBlock]:
    """Every ``BasicTransformerBlock`` of the denoiser with its stride and level, in execution order."""
    out: list[TokenBlock] = []
    if adapter.kind == "unet":
        downsample = 1
        for ref in adapter.blocks():
            out += [TokenBlock(n, m, downsample, downsample) for n, m in _transformer_blocks(ref.module, ref.name)]
            if ref.role == "down" and getattr(ref.module, "downsamplers", None):
                downsample *= 2
            if ref.role == "up" and getattr(ref.module, "upsamplers", None):
                downsample //= 2
        return out
    patch = int(getattr(adapter.model.config, "patch_size", 1) or 1)
    for ref in adapter.blocks():
        out += [TokenBlock(n, m, patch, 1) for n, m in _transformer_blocks(ref.module, ref.name)]
    return out


def block_seed(step: int, index: int) -> int:
    """A seed fixed by (denoising step, block): the same partition for both CFG halves, every call alike."""
    return zlib.crc32(f"{step}:{index}".encode())


class TokenMethod(CacheMethod):
    """Base of the token methods: block selection by level, grids, per-block-call state.

    ``setup`` picks the blocks at level <= ``max_downsample`` (refusing when there are none) into
    ``self.blocks`` and calls ``install`` for each; subclasses patch there with ``wrap_block`` and
    ``through_map``. ``reduced_calls`` counts block calls that really reduced tokens in the last call.
    """

    family = "tokens"
    after = ("solver",)
    exclusive = ("token reduction",)
    streams = frozenset({"single"})  # merging across a joint attention would have to keep the text tokens apart

    def setup(self, pipe: Any) -> None:
        every = token_blocks(self.adapter)
        if not every:
            raise refuse(self.name, f"{type(self.adapter.model).__name__} has no BasicTransformerBlock (the block "
                                    "of SD U-Nets, PixArt and DiT) to reduce tokens in")
        limit = self.values.get("max_downsample")
        chosen = [b for b in every if limit is None or b.level <= limit]
        if not chosen and "max_downsample" not in self.given:
            # the default level has no attention (tiny U-Nets start at downsample 2): use the shallowest that has
            limit = min(b.level for b in every)
            chosen = [b for b in every if b.level <= limit]
            self.fallback = f"no attention at downsample {self.values['max_downsample']}: merging at downsample {limit}"
        if not chosen:
            levels = ", ".join(str(v) for v in sorted({b.level for b in every}))
            raise refuse(self.name, f"no transformer block at downsample <= {limit} in "
                                    f"{type(self.adapter.model).__name__} (its blocks run at downsample {levels}); "
                                    "raise max_downsample")
        self.blocks = chosen
        self.latent: tuple[int, int] | None = None
        self.reduced_calls = 0
        for index, block in enumerate(chosen):
            self.install(index, block)

    def install(self, index: int, block: TokenBlock) -> None:
        raise NotImplementedError

    fallback = ""

    def describe(self) -> str:
        return super().describe() + (f" [{self.fallback}]" if self.fallback else "")

    @torch.compiler.disable
    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        super()._pre_forward(module, args, kwargs)
        sample = hidden_of(args, kwargs)
        self.latent = (int(sample.shape[-2]), int(sample.shape[-1]))

    def _reset(self) -> None:
        super()._reset()
        self.reduced_calls = 0

    def grid(self, block: TokenBlock, tokens: int) -> tuple[int, int]:
        """The (rows, cols) token grid of ``block`` for the current call, checked against the token count."""
        if self.latent is None:
            raise RuntimeError(f"{self.name}: the denoiser's input size is unknown (block called outside it)")
        h, w = (math.ceil(side / block.stride) for side in self.latent)
        if h * w != tokens:
            raise RuntimeError(f"{self.name}: {block.name} has {tokens} tokens, expected a {h}x{w} grid "
                               f"from the {self.latent[0]}x{self.latent[1]} input at stride {block.stride}")
        return h, w

    def wrap_block(self, block: TokenBlock, state: dict[str, Any]) -> None:
        """Reset ``state`` (this block's per-call map) whenever the block runs; keep its input as ``"input"``."""

        def make(inner: Any) -> Any:
            def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
                state.clear()
                state["input"] = hidden_of(args, kwargs)
                try:
                    return inner(*args, **kwargs)
                finally:
                    state.clear()

            return forward

        self.patch(block.module, make)

    def through_map(self, state: dict[str, Any], inner: Any, build: Builder | None = None) -> Any:
        """``inner`` run on the reduced tokens of the block's current map (built by ``build`` if missing).

        A map of ``False`` (nothing to reduce in this call) runs ``inner`` unchanged: bit-identical.
        """

        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            tmap = state.get("map")
            if tmap is None and build is not None:
                tmap = state["map"] = build(hidden_states, kwargs)
            if not tmap:
                return inner(hidden_states, *args, **kwargs)
            if hidden_states.shape[1] != tmap.tokens:
                raise RuntimeError(f"{self.name}: a sub-layer got {hidden_states.shape[1]} tokens, its block's "
                                   f"map was built for {tmap.tokens}")
            return tmap.expand(inner(tmap.reduce(hidden_states), *args, **kwargs))

        return forward
