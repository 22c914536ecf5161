"""ToDo: token downsampling of the keys and values of self-attention; the queries stay whole."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from effdiff.methods.cache.base import refuse
from effdiff.methods.tokens.base import TokenBlock, TokenMethod
from effdiff.registry import Paper, Param

TODO = Paper("ToDo: Token Downsampling for Efficient Generation of High-Resolution Images", "2402.13573",
             "IJCAI 2024")
MODES = ("nearest", "nearest-exact", "avg_pool", "max_pool", "bilinear")


def downsample_tokens(hidden: torch.Tensor, rows: int, cols: int, factor: int, mode: str) -> torch.Tensor:
    """``hidden`` (batch, rows·cols, channels) laid out on its grid and shrunk ``factor``× per side: by
    interpolation (``nearest`` keeps every factor-th token, as a strided convolution would) or by pooling
    ``factor``×``factor`` cells (a ragged edge pools what it has)."""
    batch, tokens, channels = hidden.shape
    grid = hidden.transpose(1, 2).reshape(batch, channels, rows, cols)
    if mode in ("avg_pool", "max_pool"):
        pool = nn.functional.avg_pool2d if mode == "avg_pool" else nn.functional.max_pool2d
        small = pool(grid, factor, factor, ceil_mode=True)
    else:
        small = nn.functional.interpolate(grid, size=(max(1, rows // factor), max(1, cols // factor)), mode=mode)
    return small.flatten(2).transpose(1, 2)


class ToDo(TokenMethod):
    """Token Downsampling: self-attention's keys and values come from the block's tokens downsampled on their
    grid, while every token still asks its own query — so nothing is merged back, and attention stays one fused
    ``scaled_dot_product_attention`` call over fewer keys (ToMe gathers and scatters tokens around it, which on a
    GPU costs more than it saves; see the token section of the README).

    Paper: Smith et al., "ToDo: Token Downsampling for Efficient Generation of High-Resolution Images" (arXiv
    2402.13573, IJCAI 2024). As the authors' code does, the downsampled tokens are the self-attention's input
    (after the block's norm) handed to it as ``encoder_hidden_states``, so its own ``to_k``/``to_v`` project them;
    ``nearest`` is the paper's operator (every ``factor``-th token, like a strided convolution). ``factor`` applies
    at the shallowest level that has attention (SD 1.5: full resolution, where the paper applies it; the bundled
    tiny U-Net's first attention is one level down), ``factor_level2`` at the next one; every DiT block is at the
    first level. The authors suggest factor 2 / 3 / 4 at 1024 / 1536 / 2048 px. The authors' optional second mode
    (ToMe merging of the keys after a timestep threshold) is left out, as their demo leaves it off.
    ``factor=1`` runs every block unchanged (bit-identical). Single-stream blocks only: a joint MMDiT attention
    reads its text through ``encoder_hidden_states``, so it is refused by declaration.
    """

    name = "todo"
    examples = {"noop": "todo:factor=1", "skips": "todo:factor=2"}
    streams = frozenset({"single"})
    paper = TODO
    summary = "downsample self-attention's keys/values on the token grid, queries whole (fused attention kept)"
    params = {
        "factor": Param(int, 2, 1, 16, help="keys/values grid shrink per side at the first attention level",
                         search=(2, 4)),
        "factor_level2": Param(int, 1, 1, 16, help="the same at the next level down (1 = untouched)"),
        "mode": Param(str, "nearest", choices=MODES, help="nearest (the paper), pooling or bilinear"),
    }

    def choose(self, every: list[TokenBlock]) -> list[TokenBlock]:
        """The blocks of the first two attention levels whose factor downsamples anything."""
        levels = sorted({b.level for b in every})
        self.factors = {level: factor for level, factor in zip(levels, (self.values["factor"],
                                                                          self.values["factor_level2"]), strict=False)}
        return [b for b in every if self.factors.get(b.level, 1) > 1]

    def install(self, index: int, block: TokenBlock) -> None:
        factor = self.factors[block.level]
        for name, attention in block.layers("attn"):
            if getattr(attention, "norm_cross", None) is not None or getattr(attention, "is_cross_attention", False):
                raise refuse(self.name, f"{block.name}.{name} is not a plain self-attention (it normalises or "
                                        "expects a second stream)")
            self.patch(attention, lambda inner, factor=factor: self._downsampled_keys(block, factor, inner))

    def _downsampled_keys(self, block: TokenBlock, factor: int, inner: Any) -> Any:
        def forward(hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                    attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
            if encoder_hidden_states is not None or attention_mask is not None:  # not self-attention as we know it
                return inner(hidden_states, encoder_hidden_states=encoder_hidden_states,
                             attention_mask=attention_mask, **kwargs)
            rows, cols = self.grid(block, hidden_states.shape[1])
            keys = downsample_tokens(hidden_states, rows, cols, factor, self.values["mode"])
            self.reduced_calls += 1
            return inner(hidden_states, encoder_hidden_states=keys, **kwargs)

        return forward
