"""Shared machinery of the token family: which transformer blocks to touch, their token grids, and running a
sub-layer on a reduced sequence of image tokens.

The adapter lists the blocks (``Adapter.token_blocks``): diffusers' ``BasicTransformerBlock`` in SD U-Nets,
PixArt and DiT; SD3's joint blocks; FLUX's double ("joint") and single ("concat") blocks, each with its
sub-layers by role. Token methods patch ``forward`` on the *instances* of the block and of those
sub-layers through the handle's undo log and leave the blocks' own code, norms and gates untouched.
Only image tokens are ever reduced: a joint attention gets its text stream whole, a concat sub-layer its
text prefix whole, and rotary tables (FLUX) follow the kept image tokens.

A block's token grid comes from the denoiser's input (``Adapter.token_grid``, recorded by the pre-hook)
and the block's stride: a U-Net block at downsample ``d`` sees ``ceil(H/d) x ceil(W/d)`` tokens, a DiT
block ``H/p x W/p`` for patch size ``p``, a FLUX block the packed grid of its position ids.
``max_downsample`` counts U-Net levels like ToMe for SD (1 = full latent resolution); every DiT block is
at level 1.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from effdiff.adapters.base import TokenBlock, hidden_of
from effdiff.methods.cache.base import CacheMethod, refuse
from effdiff.methods.tokens.maps import TokenMap

Builder = Callable[[torch.Tensor, dict], "TokenMap | bool"]


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

    def setup(self, pipe: Any) -> None:
        every = self.adapter.token_blocks()
        if not every:
            raise refuse(self.name, f"{type(self.adapter.model).__name__} has no transformer block to reduce "
                                    "tokens in")
        self.blocks = self.choose(every)
        self.latent: tuple[int, int] | None = None
        self.reduced_calls = 0
        self.install_all(self.blocks)
        self.warn_if_measured_slower()

    def choose(self, every: list[TokenBlock]) -> list[TokenBlock]:
        """The blocks to patch: those at level <= ``max_downsample`` (falling back to the shallowest level that
        has attention when the default finds none)."""
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
        return chosen

    def warn_if_measured_slower(self) -> None:
        """Say (in ``describe`` and as a warning) when this method was measured to slow down a model like this
        one on this device (``breakeven.py``): the tokens of its first reduced blocks at the model's native size."""
        import warnings

        from effdiff.methods.tokens.breakeven import notice

        grid = self.adapter.native_grid()
        if not self.blocks or grid is None:
            return
        first = min(self.blocks, key=lambda b: b.stride)
        tokens = math.ceil(grid[0] / first.stride) * math.ceil(grid[1] / first.stride)
        message = notice(self.name, self.adapter.device.type, self.adapter.kind, tokens)
        if message:
            self.slower = message
            warnings.warn(message, stacklevel=2)

    def install_all(self, blocks: list[TokenBlock]) -> None:
        """Patch the chosen blocks (``install`` each, unless a method works on groups of them)."""
        for index, block in enumerate(blocks):
            self.install(index, block)

    def install(self, index: int, block: TokenBlock) -> None:
        raise NotImplementedError

    fallback = ""
    slower = ""  # a measured slow-down on models like this one (``warn_if_measured_slower``)

    def describe(self) -> str:
        notes = [note for note in (self.fallback, self.slower) if note]
        return super().describe() + "".join(f" [{note}]" for note in notes)

    @torch.compiler.disable
    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        super()._pre_forward(module, args, kwargs)
        self.latent = self.adapter.token_grid(args, kwargs)

    def _reset(self) -> None:
        super()._reset()
        self.reduced_calls = 0

    def grid(self, block: TokenBlock, tokens: int | None = None) -> tuple[int, int]:
        """The (rows, cols) image-token grid of ``block`` for the current call, checked against ``tokens``."""
        if self.latent is None:
            raise RuntimeError(f"{self.name}: the denoiser's input size is unknown (block called outside it)")
        h, w = (math.ceil(side / block.stride) for side in self.latent)
        if tokens is not None and h * w != tokens:
            raise RuntimeError(f"{self.name}: {block.name} has {tokens} image tokens, expected a {h}x{w} grid "
                               f"from the {self.latent[0]}x{self.latent[1]} input at stride {block.stride}")
        return h, w

    def image_tokens(self, block: TokenBlock) -> int:
        h, w = self.grid(block)
        return h * w

    def wrap_block(self, block: TokenBlock, state: dict[str, Any]) -> None:
        """Reset ``state`` (this block's per-call map) whenever the block runs; keep its image input as ``"input"``."""

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

    def through_map(self, block: TokenBlock, state: dict[str, Any], inner: Any, build: Builder | None = None) -> Any:
        """``inner`` run on the reduced image tokens of the block's current map (built by ``build`` if missing).

        A map of ``False`` (nothing to reduce in this call) runs ``inner`` unchanged: bit-identical.
        """

        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            tmap = state.get("map")
            if tmap is None and build is not None:
                tmap = state["map"] = build(hidden_states, kwargs)
            if not tmap:
                return inner(hidden_states, *args, **kwargs)
            return run_reduced(self.name, block, tmap, inner, hidden_states, args, kwargs)

        return forward


def run_reduced(method: str, block: TokenBlock, tmap: TokenMap, inner: Any, hidden: torch.Tensor, args: tuple,
                kwargs: dict) -> Any:
    """``inner(hidden, ...)`` with the image tokens of ``hidden`` reduced by ``tmap`` and its output expanded back.

    A text prefix (concat blocks) passes whole and a joint attention's text stream (a keyword) is not
    touched. Rotary tables under ``block.rope`` keep their text rows and take the rows of the kept image
    tokens; as the kept positions differ per batch element, a call with rotary tables runs per element.
    """
    text = hidden.shape[1] - tmap.tokens
    if text < 0 or (text and block.streams != "concat"):
        raise RuntimeError(f"{method}: a sub-layer of {block.name} got {hidden.shape[1]} tokens, its map was built "
                           f"for {tmap.tokens} image tokens")
    reduced = tmap.reduce(hidden[:, text:])
    if text:
        reduced = torch.cat([hidden[:, :text], reduced], dim=1)
    out = call_at_kept_positions(block, tmap, inner, (reduced, *args), kwargs)
    if isinstance(out, torch.Tensor):
        return torch.cat([out[:, :text], tmap.expand(out[:, text:])], dim=1) if text else tmap.expand(out)
    return (tmap.expand(out[0]), *out[1:])  # a joint attention: (image, text, ...)


def call_at_kept_positions(block: TokenBlock, tmap: TokenMap, inner: Any, args: tuple, kwargs: dict) -> Any:
    """``inner(*args, **kwargs)`` for image tokens reduced by ``tmap``, with the rows of a rotary table under
    ``block.rope`` taken for the kept tokens (text rows first, kept whole). The kept positions differ per
    batch element, so a call with a rotary table runs per element; without one it runs as it is."""
    table = kwargs.get(block.rope) if block.rope else None
    if table is None:
        return inner(*args, **kwargs)
    positions = tmap.positions()
    prefix = table[0].shape[0] - tmap.tokens
    head = torch.arange(prefix, device=positions.device)
    outs = []
    for b in range(tmap.batch):
        rows = torch.cat([head, prefix + positions[b]])
        one = {k: batch_element(v, b, tmap.batch) for k, v in kwargs.items() if k != block.rope}
        one[block.rope] = tuple(t.index_select(0, rows) for t in table)
        outs.append(inner(*(batch_element(a, b, tmap.batch) for a in args), **one))
    return outs[0] if len(outs) == 1 else join_batch(outs)


def batch_element(value: Any, index: int, batch: int) -> Any:
    """``value``'s batch element ``index`` when it is a tensor batched like the call, else ``value``."""
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch:
        return value[index:index + 1]
    return value


def join_batch(outputs: list[Any]) -> Any:
    """Per-element outputs (tensors or tuples of tensors / ``None``) joined along the batch."""
    if isinstance(outputs[0], torch.Tensor):
        return torch.cat(outputs)
    return tuple(None if parts[0] is None else torch.cat(parts) for parts in zip(*outputs, strict=True))
