"""AT-EDM: prune the tokens a block's self-attention ranks least important, recover them by similarity."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from effdiff.adapters.base import TokenBlock
from effdiff.methods.cache.base import refuse
from effdiff.methods.tokens.base import TokenMethod, call_at_kept_positions
from effdiff.methods.tokens.maps import TokenMap, selection
from effdiff.registry import Paper, Param, RecipeError

ATEDM = Paper("Attention-Driven Training-Free Efficiency Enhancement of Diffusion Models", "2405.05252", "CVPR 2024")
PLAIN_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0")


def plain_attention(attn: nn.Module) -> bool:
    """Whether ``attn`` computes what the explicit attention functions here and in ToCa reproduce."""
    return (type(getattr(attn, "processor", None)).__name__ in PLAIN_PROCESSORS and attn.spatial_norm is None
            and attn.group_norm is None and not attn.residual_connection and attn.rescale_output_factor == 1.0)


def plain_call(role: str, args: tuple, kwargs: dict) -> bool:
    """A call of a plain attention those functions reproduce: no extra arguments, and for a self-attention
    (``role`` "attn") no text and no mask."""
    if args or set(kwargs) - {"encoder_hidden_states", "attention_mask"}:
        return False
    return role == "cross" or (kwargs.get("encoder_hidden_states") is None and kwargs.get("attention_mask") is None)


def attention_with_map(attn: nn.Module, x: torch.Tensor, rows: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention of ``attn`` on ``x`` (B, N, C), plus its head-averaged probabilities (B, N, N).

    The same arithmetic as diffusers' plain processors (scale 1/sqrt(head_dim)), with the softmax written
    out so the N×N map can be kept: SDPA never materialises it. Work goes in blocks of ``rows`` queries,
    all heads of a block before the next, so each head's scores stay in cache and the map is written
    once. The cost over SDPA is that map (B·N² floats) and unfused score/softmax passes: about 1.7× the
    attention time at 2,304 tokens on this CPU (measured in ``benchmarks/tokens_breakeven.py``).
    """
    batch, tokens, _ = x.shape
    heads = attn.heads
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    dim = q.shape[-1] // heads
    q, k, v = (t.view(batch, tokens, heads, dim).transpose(1, 2) for t in (q, k, v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    q, keys, v = q.contiguous(), k.transpose(2, 3).contiguous(), v.contiguous()
    out = torch.empty(batch, tokens, heads, dim, dtype=q.dtype, device=q.device)
    mean = torch.empty(batch, tokens, tokens, dtype=q.dtype, device=q.device)
    for start in range(0, tokens, rows):
        stop = min(start + rows, tokens)
        block = mean[:, start:stop]
        for h in range(heads):
            probs = torch.bmm(q[:, h, start:stop], keys[:, h]).mul_(dim ** -0.5).softmax(-1)
            out[:, start:stop, h] = torch.bmm(probs, v[:, h])
            if h:
                block.add_(probs)
            else:
                block.copy_(probs)
        block.mul_(1.0 / heads)
    out = out.view(batch, tokens, heads * dim)
    return attn.to_out[1](attn.to_out[0](out)), mean


def attention_map(q: torch.Tensor, k: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """Head-averaged attention probabilities (B, N, N) of queries ``q`` on keys ``k`` (both B, heads, N, D),
    ``rows`` queries at a time so only one block of one head's scores exists at once."""
    batch, heads, tokens, dim = q.shape
    keys = k.transpose(2, 3)
    mean = torch.zeros(batch, tokens, tokens, dtype=q.dtype, device=q.device)
    for start in range(0, tokens, rows):
        block = mean[:, start:start + rows]
        for h in range(heads):
            block.add_(torch.matmul(q[:, h, start:start + rows], keys[:, h]).mul_(dim ** -0.5).softmax(-1))
    return mean.mul_(1.0 / heads)


def weighted_pagerank(probs: torch.Tensor, iterations: int) -> torch.Tensor:
    """Token importance (B, N): PageRank on the attention graph, each query's vote weighted by its own score.

    ``probs[b, i, j]`` is how much token i attends to j (rows sum to 1), so ``s <- probs^T s`` passes every
    token's importance to the tokens it attends to; starting from uniform scores, the iteration converges
    to the attention graph's stationary distribution (the paper's weighted PageRank).
    """
    scores = torch.full(probs.shape[:2], 1.0 / probs.shape[1], dtype=probs.dtype, device=probs.device)
    for _ in range(iterations):
        scores = torch.bmm(scores.unsqueeze(1), probs).squeeze(1)
    return scores


def prune_map(probs: torch.Tensor, scores: torch.Tensor, kept: int) -> TokenMap:
    """Keep the ``kept`` highest-scoring tokens; each pruned token copies the kept token it attends to most."""
    batch, tokens = scores.shape
    keep = scores.topk(kept, dim=-1, sorted=False).indices.sort(dim=-1).values
    source = probs.gather(2, keep.unsqueeze(1).expand(batch, tokens, kept)).argmax(dim=-1)
    source.scatter_(1, keep, torch.arange(kept, device=keep.device).expand(batch, kept))
    return selection(keep, source, tokens)


class ATEDM(TokenMethod):
    """Attention-driven token pruning with similarity-based recovery and a denoising-step-aware schedule.

    Paper: Wang, Liu, Kang, Li, Lin, Jha, Liu, "Attention-Driven Training-Free Efficiency Enhancement of
    Diffusion Models" (arXiv 2405.05252, CVPR 2024). Pruning works on *spans* of consecutive blocks: in
    the span's first block the self-attention runs in full and yields its attention map; the weighted
    PageRank over that map (``iterations`` power steps) scores every token and the ``int(N * ratio)``
    lowest are pruned. The rest of that block (cross-attention, feed-forward) and every later block of the
    span run on the kept tokens only, with fused attention (no map needed there). At the end of the span
    the pruned tokens are recovered by similarity-based copy: each pruned token takes the change that the
    kept token it attends to most (its most similar kept token by the same map) went through, added to its
    own value (inside the first block: that token's sub-layer outputs), so the grid is whole again.
    U-Nets: a span is one attention block (all ``BasicTransformerBlock``s of one ``Transformer2DModel``),
    recovered before the ResNet that follows, as in the paper (SD 1.x has one block per attention block;
    SD-XL up to ten). DiT/PixArt/MMDiTs: runs of ``span`` blocks. DSAP: during the first ``early``
    fraction of the denoising steps, when attention maps are least informative, the spans prune
    ``early_ratio`` instead of ``ratio`` (0 = unpruned, which also skips the explicit attention).

    Cost: the attention map does not exist in SDPA, so a span's first block computes its self-attention
    with an explicit softmax (``attention_with_map``), the N×N map written per head; the saving is in
    everything after it in the span, and whether it pays is measured in ``benchmarks/tokens_breakeven.py``.
    ``ratio=0`` is bit-identical.

    MMDiTs (FLUX, SD3): the first block's joint attention runs fused as it is; the image tokens are ranked
    on the image-to-image part of its map (the same queries and keys, formed apart by
    ``Adapter.image_queries_keys``, text columns left out). Later blocks run with every text token and the
    kept image tokens at their own rotary positions (per batch element, whose kept positions differ).
    Text tokens are never pruned. A span does not cross from FLUX's double to its single blocks, nor
    survive extra inputs added between blocks (ControlNet residuals).
    """

    name = "atedm"
    examples = {"noop": "atedm:ratio=0", "skips": "atedm:ratio=0.5,early=0"}
    paper = ATEDM
    summary = "prune tokens ranked by attention PageRank, recover by similarity copy, prune less early"
    params = {
        "ratio": Param(float, 0.5, 0.0, 1.0, help="fraction of a block's tokens pruned after self-attention",
                       search=(0.1, 0.7)),
        "early": Param(float, 0.25, 0.0, 1.0, help="DSAP: fraction of the denoising steps that prune early_ratio"),
        "early_ratio": Param(float, 0.0, 0.0, 1.0, help="DSAP: pruning ratio in the early steps"),
        "iterations": Param(int, 3, 1, 100, help="weighted-PageRank power iterations"),
        "max_downsample": Param(int, 1, 1, 64, help="U-Net: only blocks at downsample <= this (1 = full res)"),
        "span": Param(int, 4, 1, 1000, help="DiT/MMDiT: consecutive blocks a pruning lasts (U-Net: one attention "
                                            "block)"),
    }

    def __init__(self, **values: Any) -> None:
        super().__init__(**values)
        for key in ("ratio", "early_ratio"):
            if self.values[key] >= 1.0:
                raise RecipeError(f"{self.name}: {key} {self.values[key]:g} would prune every token; it must be < 1")

    def install_all(self, blocks: list[TokenBlock]) -> None:
        self.spans = self.spans_of(blocks)
        for span in self.spans:
            state: dict[str, Any] = {}
            first, *rest = span
            self.install_ranker(first, state, alone=not rest)
            for position, block in enumerate(rest, start=1):
                self.patch(block.module, self.follower(block, state, last=position == len(rest)))

    def spans_of(self, blocks: list[TokenBlock]) -> list[list[TokenBlock]]:
        """U-Nets: the blocks of one attention block (a ``Transformer2DModel``: the ResNet after it needs the whole
        grid); transformers: runs of ``span`` consecutive blocks of one stream layout."""
        spans: list[list[TokenBlock]] = []
        for block in blocks:
            if self.adapter.kind == "unet":
                joins = spans and spans[-1][-1].name.rsplit(".", 2)[0] == block.name.rsplit(".", 2)[0]
            else:
                joins = spans and len(spans[-1]) < self.values["span"] and spans[-1][-1].streams == block.streams
            if joins:
                spans[-1].append(block)
            else:
                spans.append([block])
        return spans

    def install_ranker(self, block: TokenBlock, state: dict[str, Any], alone: bool) -> None:
        """The span's first block: its first attention ranks the image tokens; its later sub-layers run on the
        kept ones, recovered inside the block; then (unless the span is this block alone) its output leaves
        with the kept tokens only, and its whole output is kept as the span's anchor."""
        (name, attn), *later = block.layers("attn")
        if block.streams == "single" and (not plain_attention(attn)
                                          or getattr(block.module, "only_cross_attention", False)):
            raise refuse(self.name, f"{block.name}.{name} uses {type(attn.processor).__name__} with options whose "
                                    "attention map it cannot reproduce; it needs a plain self-attention")
        self.patch(attn, lambda inner: self._ranking(block, attn, state, inner))
        for _, layer in later + block.layers("cross") + block.layers("ff"):
            self.patch(layer, lambda inner: self.through_map(block, state, inner))

        def make(inner: Any) -> Any:
            def forward(*args: Any, **kwargs: Any) -> Any:
                state.clear()
                out = inner(*args, **kwargs)
                tmap = state.get("map")
                if alone or not tmap:
                    return out
                state["anchor"] = anchor = block.image_out(out)
                return block.with_image(out, tmap.reduce(anchor))

            return forward

        self.patch(block.module, make)

    @staticmethod
    def follower(block: TokenBlock, state: dict[str, Any], last: bool) -> Any:
        """A later block of a span: runs whole on the kept tokens (fused attention, rotary rows of the kept
        positions); the span's last block recovers every pruned token as its anchor value plus the change its
        most similar kept token went through over the span."""

        def make(inner: Any) -> Any:
            def forward(*args: Any, **kwargs: Any) -> Any:
                tmap = state.get("map")
                if not tmap:
                    return inner(*args, **kwargs)
                out = call_at_kept_positions(block, tmap, inner, args, kwargs)
                if not last:
                    return out
                kept, anchor = block.image_out(out), state["anchor"]
                whole = anchor + tmap.expand(kept - tmap.reduce(anchor))
                whole.view(-1, whole.shape[-1]).index_copy_(0, tmap.keep, kept.reshape(-1, kept.shape[-1]))
                return block.with_image(out, whole)

            return forward

        return make

    def ratio_now(self) -> float:
        """DSAP: the early ratio during the first ``early`` fraction of the steps, ``ratio`` after."""
        ctx = self._ctx
        early = ctx.total_steps > 0 and ctx.step_index < self.values["early"] * ctx.total_steps
        return self.values["early_ratio"] if early else self.values["ratio"]

    def _ranking(self, block: TokenBlock, attn: nn.Module, state: dict[str, Any], inner: Any) -> Any:
        """The block's first attention, ranking the image tokens. A plain self-attention (U-Net, PixArt, DiT) is
        computed with its map written out; a joint attention (MMDiT) runs as it is (fused) and its image-to-image
        map is formed apart from the same queries and keys, text columns left out."""

        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            tokens = self.image_tokens(block)
            text = hidden_states.shape[1] - tokens  # a concat block's text prefix
            pruned = int(tokens * self.ratio_now())
            if block.streams == "single":
                plain = plain_call("attn", args, kwargs)
            else:
                plain = kwargs.get("attention_mask") is None
            if not pruned or not plain:
                state["map"] = False
                return inner(hidden_states, *args, **kwargs)
            if block.streams == "single":
                self.grid(block, hidden_states.shape[1])  # checks the block sees the token grid it should
                out, probs = attention_with_map(attn, hidden_states)
            else:
                out = inner(hidden_states, *args, **kwargs)
                image = hidden_states[:, text:]
                probs = attention_map(*self.adapter.image_queries_keys(block, attn, image, kwargs))
            scores = weighted_pagerank(probs, self.values["iterations"])
            state["map"] = prune_map(probs, scores, tokens - pruned)
            self.reduced_calls += 1
            return out

        return forward
