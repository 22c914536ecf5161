"""AT-EDM: prune the tokens a block's self-attention ranks least important, recover them by similarity."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from effdiff.methods.cache.base import refuse
from effdiff.methods.tokens.base import TokenBlock, TokenMethod
from effdiff.methods.tokens.maps import TokenMap, selection
from effdiff.registry import Paper, Param, RecipeError

ATEDM = Paper("Attention-Driven Training-Free Efficiency Enhancement of Diffusion Models", "2405.05252", "CVPR 2024")
PLAIN_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0")


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
    Diffusion Models" (arXiv 2405.05252, CVPR 2024). In each chosen transformer block the self-attention
    runs in full and yields its attention map; the weighted PageRank over that map (``iterations`` power
    steps) scores every token, the ``int(N * ratio)`` lowest are pruned, and the block's later layers
    (cross-attention, feed-forward) run on the kept tokens only. Pruned positions are then recovered by
    copying: each takes the cross-attention / feed-forward output of the kept token it attends to most
    (its most similar kept token by the same map) and adds it to its own residual stream, so the grid is
    whole again for the convolutions that follow. DSAP: during the first ``early`` fraction of the
    denoising steps, when attention maps are least informative, the block prunes ``early_ratio`` instead
    of ``ratio`` (0 = unpruned, so those steps also skip the explicit attention below).

    Cost: the attention map does not exist in SDPA, so a pruning block computes self-attention with an
    explicit softmax (``attention_with_map``), the N×N map written per head. The saving is in the
    layers after it; whether that pays depends on resolution and is measured in
    ``benchmarks/tokens_breakeven.py``. Recovery copies the *output* of the most similar kept token, not
    the whole token: the pruned token keeps its own residual, which in diffusers' blocks (one transformer
    layer per block in SD 1.x) is the natural reading of the paper's copy. ``ratio=0`` is bit-identical.
    """

    name = "atedm"
    examples = {"noop": "atedm:ratio=0", "skips": "atedm:ratio=0.5,early=0"}
    paper = ATEDM
    summary = "prune tokens ranked by attention PageRank, recover by similarity copy, prune less early"
    params = {
        "ratio": Param(float, 0.5, 0.0, 1.0, help="fraction of a block's tokens pruned after self-attention"),
        "early": Param(float, 0.25, 0.0, 1.0, help="DSAP: fraction of the denoising steps that prune early_ratio"),
        "early_ratio": Param(float, 0.0, 0.0, 1.0, help="DSAP: pruning ratio in the early steps"),
        "iterations": Param(int, 3, 1, 100, help="weighted-PageRank power iterations"),
        "max_downsample": Param(int, 1, 1, 64, help="U-Net: only blocks at downsample <= this (1 = full res)"),
    }

    def __init__(self, **values: Any) -> None:
        super().__init__(**values)
        for key in ("ratio", "early_ratio"):
            if self.values[key] >= 1.0:
                raise RecipeError(f"{self.name}: {key} {self.values[key]:g} would prune every token; it must be < 1")

    def install(self, index: int, block: TokenBlock) -> None:
        module = block.module
        attn = module.attn1
        processor = type(getattr(attn, "processor", None)).__name__
        unsupported = (processor not in PLAIN_PROCESSORS or attn.spatial_norm is not None
                       or attn.group_norm is not None or attn.residual_connection
                       or attn.rescale_output_factor != 1.0 or getattr(attn, "only_cross_attention", False))
        if unsupported:
            raise refuse(self.name, f"{block.name}.attn1 uses {processor} with options whose attention map it "
                                    "cannot reproduce; it needs a plain self-attention")
        state: dict[str, Any] = {}
        self.wrap_block(block, state)
        self.patch(attn, lambda inner: self._ranking(block, state, inner))
        for name in ("attn2", "ff"):
            if getattr(module, name, None) is not None:
                self.patch(getattr(module, name), lambda inner: self.through_map(state, inner))

    def ratio_now(self) -> float:
        """DSAP: the early ratio during the first ``early`` fraction of the steps, ``ratio`` after."""
        ctx = self._ctx
        early = ctx.total_steps > 0 and ctx.step_index < self.values["early"] * ctx.total_steps
        return self.values["early_ratio"] if early else self.values["ratio"]

    def _ranking(self, block: TokenBlock, state: dict[str, Any], inner: Any) -> Any:
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            tokens = hidden_states.shape[1]
            pruned = int(tokens * self.ratio_now())
            plain = not args and all(kwargs.get(k) is None for k in ("encoder_hidden_states", "attention_mask"))
            if not pruned or not plain or set(kwargs) - {"encoder_hidden_states", "attention_mask"}:
                state["map"] = False
                return inner(hidden_states, *args, **kwargs)
            self.grid(block, tokens)  # checks the block sees the token grid it should
            out, probs = attention_with_map(block.module.attn1, hidden_states)
            scores = weighted_pagerank(probs, self.values["iterations"])
            state["map"] = prune_map(probs, scores, tokens - pruned)
            self.reduced_calls += 1
            return out

        return forward
