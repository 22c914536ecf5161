"""ToMe for SD: merge similar tokens before attention (optionally cross-attention and MLP), copy back after."""

from __future__ import annotations

from typing import Any

import torch

from effdiff.methods.cache.base import refuse
from effdiff.methods.tokens.base import TokenBlock, TokenMethod, block_seed
from effdiff.methods.tokens.maps import TokenMap, bipartite, partition
from effdiff.registry import Paper, Param, RecipeError

TOME = Paper("Token Merging for Fast Stable Diffusion", "2303.17604", "CVPR 2023 Workshop (ECV)")


class ToMe(TokenMethod):
    """Token Merging for Stable Diffusion, on U-Net, DiT/PixArt and FLUX/SD3 transformer blocks.

    Paper: Bolya, Hoffman, "Token Merging for Fast Stable Diffusion" (arXiv 2303.17604, CVPR 2023 ECV
    workshop). The token grid is split into sx×sy cells with one *dst* token per cell (at a random place
    when ``use_rand``), every other token is *src*; each src finds its most similar dst (cosine), and the
    ``r = int(N * ratio)`` src with the highest similarity are averaged into their dst. The merged
    sequence goes through the chosen sub-layers (self-attention by default), and every token reads its
    merged row back ("unmerge") before the block's residual add.

    Same algorithm and metric as ``tomesd`` (cosine similarity of the block's input tokens, once per
    block call; with ``use_rand=false`` the merges are exactly ``tomesd``'s), implemented to be faster:
    merging is one ``index_select`` + one ``index_add_`` and unmerging one ``index_select`` on flattened
    rows (``tomesd`` gathers with expanded indices, sorts all tokens to split them and unmerges with
    three scatters into a zero buffer), and the similarity is only computed when something is merged.
    The random partition is seeded by (step, block), so both CFG halves share it whether they run
    batched or as separate calls, and every call is reproducible. ``ratio`` is never capped: above
    ``1 - 1/(sx·sy)`` (each cell keeps its dst) it is refused, and a token grid smaller than the
    stride is an error naming the block. ``ratio=0`` runs the blocks unchanged (bit-identical).

    MMDiTs (FLUX, SD3): only image tokens merge, matched on the block's image-stream input; the joint
    attention keeps every text query and key, FLUX's single blocks pass their text prefix whole, and a
    merged token attends at its destination's rotary position (FLUX runs such calls per batch element,
    whose kept positions differ). ``merge_mlp`` merges before the image feed-forward (FLUX single blocks:
    ``proj_mlp``); there is no cross-attention to merge before.
    """

    name = "tome"
    examples = {"noop": "tome:ratio=0", "skips": "tome:ratio=0.5"}
    paper = TOME
    summary = "merge similar tokens before attention, copy them back after (U-Net, DiT, MMDiT image tokens)"
    params = {
        "ratio": Param(float, 0.5, 0.0, 1.0, help="fraction of a block's tokens merged away",
                       search=(0.1, 0.7)),
        "max_downsample": Param(int, 1, 1, 64, help="U-Net: only blocks at downsample <= this (1 = full res)"),
        "sx": Param(int, 2, 1, 64, help="stride of the dst grid along x"),
        "sy": Param(int, 2, 1, 64, help="stride of the dst grid along y"),
        "use_rand": Param(bool, True, help="random dst place per cell (seeded by step and block)"),
        "merge_attn": Param(bool, True, help="merge before self-attention"),
        "merge_crossattn": Param(bool, False, help="merge before cross-attention"),
        "merge_mlp": Param(bool, False, help="merge before the feed-forward"),
    }

    def __init__(self, **values: Any) -> None:
        super().__init__(**values)
        v = self.values
        most = 1.0 - 1.0 / (v["sx"] * v["sy"])
        if v["ratio"] > most:
            raise RecipeError(f"{self.name}: ratio {v['ratio']:g} cannot be honoured with a {v['sx']}x{v['sy']} "
                              f"stride: each cell keeps its dst token, so at most 1 - 1/(sx*sy) = {most:g} of the "
                              "tokens can merge; raise sx/sy or lower ratio")
        if v["ratio"] > 0 and not (v["merge_attn"] or v["merge_crossattn"] or v["merge_mlp"]):
            raise RecipeError(f"{self.name}: merge_attn, merge_crossattn and merge_mlp are all false, so nothing "
                              "would be merged; enable one")

    def install(self, index: int, block: TokenBlock) -> None:
        state: dict[str, Any] = {}
        self.wrap_block(block, state)
        roles = [role for role, on in (("attn", self.values["merge_attn"]), ("cross", self.values["merge_crossattn"]),
                                       ("ff", self.values["merge_mlp"])) if on]
        layers = [layer for role in roles for _, layer in block.layers(role)]
        if "ff" in roles and getattr(block.module, "_chunk_size", None) is not None:
            raise refuse(self.name, f"{block.name} runs its feed-forward in chunks; merge_mlp needs it whole")

        def build(hidden: torch.Tensor, kwargs: dict) -> TokenMap | bool:
            return self.match(block, index, state["input"], kwargs)

        for layer in layers:
            self.patch(layer, lambda inner: self.through_map(block, state, inner, build))

    def match(self, block: TokenBlock, index: int, hidden: torch.Tensor, kwargs: dict) -> TokenMap | bool:
        """This block call's merge map from the block's input tokens; ``False`` when there is nothing to merge."""
        tokens = hidden.shape[1]
        r = int(tokens * self.values["ratio"])
        if r == 0 or kwargs.get("attention_mask") is not None:  # a token mask cannot follow merged keys
            return False
        sx, sy = self.values["sx"], self.values["sy"]
        h, w = self.grid(block, tokens)
        if h < sy or w < sx:
            raise RecipeError(f"{self.name}: {block.name} has a {h}x{w} token grid, smaller than the "
                              f"{sx}x{sy} stride, so ratio {self.values['ratio']:g} cannot be honoured there; "
                              "lower max_downsample, sx or sy")
        generator = None
        if self.values["use_rand"]:
            generator = torch.Generator().manual_seed(block_seed(self._ctx.step_index, index))
        dst, src = partition(h, w, sx, sy, generator, hidden.device)
        self.reduced_calls += 1
        return bipartite(hidden, dst, src, r)
