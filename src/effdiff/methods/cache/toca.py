"""ToCa: token-wise feature caching — between full steps, recompute only the tokens that most need it.

FORA reuses every attention and MLP output whole for N-1 of every N steps. ToCa keeps the same cache
but, at the cached steps, recomputes a *fraction* of the tokens in every sub-layer (self-attention,
cross-attention, feed-forward) and scatters them into the cache; the other tokens keep their cached
output. Which tokens: the highest *caching score*, a weighted sum of

- s1 influence: how much attention the token receives (column sum of the self-attention map),
- s2 cross-attention entropy: how spread the token's attention over the text is,
- s3 staleness: how many cached steps in a row the token has been reused in this sub-layer,
- s4 spatial uniformity: a bonus for the best token of every ``grid`` x ``grid`` cell,

and how many: ``ratio`` times a depth factor (shallow layers more, deep fewer) times a per-type factor.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from effdiff.adapters.base import TokenBlock
from effdiff.context import StepContext
from effdiff.methods.cache.base import Forward, refuse, refuse_chunked_feed_forward
from effdiff.methods.tokens.atedm import attention_with_map, plain_attention, plain_call
from effdiff.methods.tokens.base import TokenMethod
from effdiff.registry import Paper, Param

TOCA = Paper("Accelerating Diffusion Transformers with Token-wise Feature Caching", "2410.05317", "ICLR 2025")
FACTORS = {"attn": "attn", "cross": "cross", "ff": "mlp"}  # sub-layer role -> the param holding its type factor


def attend_queries(attn: nn.Module, x: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Self-attention output of ``queries`` (B, M, C), rows of ``x`` (B, N, C), against keys/values of all of ``x``.

    Exactly what the full layer gives those M tokens (the arithmetic of ``AttnProcessor2_0``): a query's
    output depends on its own row and on every key and value, so recomputing M queries costs the K/V
    projections of all N tokens plus M/N of the rest.
    """
    batch, heads = x.shape[0], attn.heads
    q, k, v = attn.to_q(queries), attn.to_k(x), attn.to_v(x)
    dim = k.shape[-1] // heads
    q, k, v = (t.view(batch, -1, heads, dim).transpose(1, 2) for t in (q, k, v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, -1, heads * dim)
    return attn.to_out[1](attn.to_out[0](out.to(q.dtype)))


def cross_attention_entropy(attn: nn.Module, x: torch.Tensor, context: torch.Tensor,
                            mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-attention of ``x`` (B, M, C) on ``context``, plus each query's entropy over the context (B, M).

    The softmax is written out (diffusers' ``AttnProcessor`` arithmetic) because SDPA never returns it;
    over the few text tokens that costs little. The entropy is that of the head-averaged distribution.
    """
    batch, tokens = x.shape[:2]
    if attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    q = attn.head_to_batch_dim(attn.to_q(x))
    k, v = attn.head_to_batch_dim(attn.to_k(context)), attn.head_to_batch_dim(attn.to_v(context))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if mask is not None:
        mask = attn.prepare_attention_mask(mask, context.shape[1], batch)
    probs = attn.get_attention_scores(q, k, mask)
    out = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(torch.bmm(probs, v))))
    mean = probs.view(batch, attn.heads, tokens, -1).mean(1)
    return out, -(mean * mean.clamp_min(1e-12).log()).sum(-1)


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Each row scaled to [0, 1], so a score's weight is the most it can add."""
    low = x.amin(-1, keepdim=True)
    return (x - low) / (x.amax(-1, keepdim=True) - low).clamp_min(1e-12)


def grid_cells(h: int, w: int, side: int, device: torch.device) -> torch.Tensor:
    """Cell number of every token of an h x w row-major grid cut into side x side cells (edges may be smaller)."""
    rows = torch.arange(h, device=device).view(-1, 1) // side
    cols = torch.arange(w, device=device).view(1, -1) // side
    return (rows * -(-w // side) + cols).flatten()


def spatial_bonus(score: torch.Tensor, cells: torch.Tensor, bonus: float) -> torch.Tensor:
    """s4: add ``bonus`` to the best-scoring token of every cell (ties: the lower index), spreading the choice."""
    batch, tokens = score.shape
    rank = score.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    index = cells.expand(batch, tokens)
    best = torch.full((batch, int(cells.max()) + 1), tokens, dtype=rank.dtype, device=score.device)
    best.scatter_reduce_(1, index, rank, "amin")
    return score + bonus * (rank == best.gather(1, index)).to(score.dtype)


def choose(score: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` highest-scoring tokens of every row, in ascending token order (B, count)."""
    return score.topk(count, dim=-1).indices.sort(dim=-1).values


def flat_rows(idx: torch.Tensor, tokens: int) -> torch.Tensor:
    """Rows of (B, M) token indices in the (B * N, C) view of a token sequence."""
    return (idx + torch.arange(idx.shape[0], device=idx.device).view(-1, 1) * tokens).flatten()


class ToCa(TokenMethod):
    """Token-wise feature caching of every transformer block's self-attention, cross-attention and MLP.

    Paper: Zou, Liu, Liu, Huang, Zhang, "Accelerating Diffusion Transformers with Token-wise Feature
    Caching" (arXiv 2410.05317, ICLR 2025). Every ``interval``-th step computes every token and fills
    the cache (and, when their weights are > 0, records the self-attention influence s1 and the
    cross-attention entropy s2 of every token). At the steps between, sub-layer ``kind`` of block ``l``
    (of L) at step k of K recomputes ``round(N * ratio * (1 + depth - 2 * depth * l / (L - 1)) *
    (1 - time + 2 * time * (k + 1) / K) * factor[kind])`` of its N image tokens (clamped to [0, N]; the
    authors' "ToCa" schedule, which recomputes more in shallow layers and late steps), the ones with the
    highest caching score
    ``influence * s1 + entropy * s2 + staleness * s3 / interval`` plus the ``bonus`` of s4 (s1, s2
    scaled to [0, 1]; s3 counts the cached steps the token was reused in a row). Recomputed tokens
    are exact for their inputs: the MLP and cross-attention are token-wise, and self-attention runs
    the chosen tokens as queries against the keys and values of *all* current tokens
    (``attend_queries``). s1 comes from the last full step; s2 is refreshed for recomputed tokens.
    With batched CFG both halves recompute the same tokens (scores averaged), as the authors do.

    Type factors default to the authors' released PixArt setting: cross-attention 0.6, MLP 1.6, and
    self-attention 0 — their final code reuses self-attention whole at cached steps, noting that
    partial self-attention propagated errors; ``attn > 0`` recomputes it token-wise as described above.
    U-Nets: the same applies to the ``BasicTransformerBlock`` sub-layers of SD's transformer blocks
    (resnets and convolutions always run), as FORA does. ``ratio=0`` is FORA with the same interval;
    ``interval=1`` is bit-identical to the baseline.

    MMDiTs (FLUX, SD3): the image feed-forward (FLUX single blocks: ``proj_mlp``) is recomputed token-wise
    and its text tokens (in a single block's text prefix) every time; the joint attention is reused whole
    (``attn=0``) or, with ``attn > 0``, recomputed whole at every step, since a joint attention with rotary
    positions cannot run a few queries alone here. Text feed-forwards (``ff_context``) always run.
    """

    name = "toca"
    examples = {"noop": "toca:interval=1", "skips": "toca:interval=2,ratio=0.5,attn=1,influence=1"}
    family = "cache"
    exclusive = ("layer outputs",)
    paper = TOCA
    summary = "token-wise caching: between full steps recompute the highest-scoring fraction of tokens per layer"
    params = {
        "interval": Param(int, 3, 1, 1000, help="every token computed every `interval` steps",
                          search=(2, 6)),
        "ratio": Param(float, 0.3, 0.0, 1.0, help="base fraction of tokens recomputed per sub-layer at cached steps",
                       search=(0.1, 0.9)),
        "depth": Param(float, 0.6, 0.0, 1.0, help="depth schedule: block l recomputes x(1 + depth - 2 depth l/(L-1))"),
        "time": Param(float, 0.4, 0.0, 1.0, help="timestep schedule: x(1 - time + 2 time k/K) at step k of K"),
        "attn": Param(float, 0.0, 0.0, 10.0, help="type factor of self-attention (0: reused whole, as released)"),
        "cross": Param(float, 0.6, 0.0, 10.0, help="type factor of cross-attention"),
        "mlp": Param(float, 1.6, 0.0, 10.0, help="type factor of the feed-forward layer"),
        "influence": Param(float, 0.0, 0.0, 100.0, help="weight of s1, attention received (map at full steps)"),
        "entropy": Param(float, 1.0, 0.0, 100.0, help="weight of s2, cross-attention entropy"),
        "staleness": Param(float, 1.0, 0.0, 100.0, help="weight of s3, cached steps reused in a row / interval"),
        "bonus": Param(float, 0.4, 0.0, 100.0, help="s4: score added to the best token of every grid cell"),
        "grid": Param(int, 4, 1, 1024, help="s4: cell side in tokens"),
    }

    def setup(self, pipe: Any) -> None:
        v = self.values
        partial = v["interval"] > 1 and v["ratio"] > 0
        self.scored = {"influence": partial and v["influence"] > 0, "entropy": partial and v["entropy"] > 0}
        self.fractions: dict[tuple[int, str], float] = {}
        self.cells: dict[tuple[int, int], torch.Tensor] = {}
        self.tokens = [0, 0]  # [computed, total] sub-layer token evaluations in the last call
        refuse_chunked_feed_forward(self.name, self.adapter.model)
        super().setup(pipe)

    def install(self, index: int, block: TokenBlock) -> None:
        module = block.module
        if getattr(module, "only_cross_attention", False):
            raise refuse(self.name, f"{block.name} attends only to the text in attn1; ToCa needs a self-attention")
        last = max(len(self.blocks) - 1, 1)
        depth = 1 + self.values["depth"] - 2 * self.values["depth"] * index / last
        for role, factor in FACTORS.items():
            for name, layer in block.layers(role):
                fraction = max(self.values["ratio"] * depth * self.values[factor], 0.0)
                if role != "ff" and fraction and block.streams == "single" and not plain_attention(layer):
                    raise refuse(self.name, f"{block.name}.{name} uses {type(layer.processor).__name__} with "
                                            "options ToCa cannot recompute token-wise; it needs a plain attention")
                if role != "ff" and fraction and block.streams != "single":
                    # a joint attention with rotary positions cannot run a few queries alone: it runs whole
                    self.fallback = (f"{factor}>0 on {block.streams} blocks: their attention is recomputed whole "
                                     f"at every step ({factor}=0 reuses it whole)")
                    continue
                kind = (role, name)
                self.fractions[index, kind] = fraction
                self.patch(layer, lambda inner, kind=kind, layer=layer: self._sublayer(index, block, kind, layer,
                                                                                       inner))

    def begin(self, state: dict[str, Any], ctx: StepContext) -> None:
        state["refresh"] = ctx.step_index % self.values["interval"] == 0 or "layers" not in state
        state.setdefault("layers", {})
        self.count(not state["refresh"])

    def step_factor(self) -> float:
        """The paper's timestep factor: ``1 - time`` at the first step rising to ``1 + time`` at the last, so the
        low-noise steps, where detail forms, recompute more tokens (the authors count steps down: their
        ``1 + w - 2 w step / num_steps`` with ``step`` from ``num_steps - 1`` to 0)."""
        ctx, weight = self._ctx, self.values["time"]
        if ctx.total_steps <= 0:
            return 1.0
        remaining = ctx.total_steps - 1 - ctx.step_index
        return 1 + weight - 2 * weight * remaining / ctx.total_steps

    def _reset(self) -> None:
        super()._reset()
        self.tokens = [0, 0]

    @property
    def computed_fraction(self) -> float:
        """Share of the sub-layer token evaluations of the last call that really ran."""
        return self.tokens[0] / self.tokens[1] if self.tokens[1] else 0.0

    # --- one sub-layer call ---------------------------------------------------------------------
    def _sublayer(self, index: int, block: TokenBlock, kind: tuple[str, str], module: nn.Module,
                  inner: Forward) -> Forward:
        """Full at refresh steps; else the cached output with the chosen image tokens recomputed. A concat
        block's feed-forward recomputes its text prefix every time (its text rows are never stale); a sub-layer
        recomputed by no token (fraction 0: attention reused whole, text rows included) may return anything, a
        joint attention's tuple too."""
        role = kind[0]

        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            state = self.current
            layer = state["layers"].setdefault(index, {})
            batch, tokens = hidden_states.shape[:2]
            cache = layer.get(kind)
            self.tokens[1] += batch * tokens
            if block.streams == "single" and tokens != self.image_tokens(block):
                # a token method before ToCa (AT-EDM, ToMe) merged or pruned tokens: they no longer sit on the
                # grid its scores and cache rows are laid out on, so this call runs whole
                self.fallback = "tokens merged or pruned by an earlier method: those sub-layer calls run whole"
                self.tokens[0] += batch * tokens
                return inner(hidden_states, *args, **kwargs)
            if state["refresh"] or cache is None or layer["shape", kind] != (batch, tokens):
                out = self._full(role, module, layer, inner, hidden_states, args, kwargs)
                out = out.contiguous() if isinstance(out, torch.Tensor) else out
                layer[kind], layer["shape", kind] = out, (batch, tokens)
                layer["stale", kind] = torch.zeros(batch, self.image_tokens(block), device=hidden_states.device)
                self.tokens[0] += batch * tokens
                return out
            image = layer["stale", kind].shape[1]
            text = tokens - image if role == "ff" else 0  # an attention reused whole keeps its text rows too
            count = round(min(self.fractions[index, kind] * self.step_factor(), 1.0) * image)
            stale = layer["stale", kind]
            stale += 1
            if not (count or text):
                return cache
            idx = torch.empty(batch, 0, dtype=torch.long, device=stale.device)
            if count:
                idx = choose(self._score(block, layer, stale), count)
                stale.view(-1)[flat_rows(idx, image)] = 0
            if text:
                head = torch.arange(text, device=idx.device).expand(batch, text)
                idx = torch.cat([head, idx + text], dim=1)
            rows = flat_rows(idx, tokens)
            fresh = self._partial(role, module, layer, inner, hidden_states, idx, rows, args, kwargs)
            cache.view(batch * tokens, -1).index_copy_(0, rows, fresh.reshape(rows.numel(), -1))
            self.tokens[0] += rows.numel()
            return cache

        return forward

    def _full(self, role: str, attn: nn.Module, layer: dict[Any, Any], inner: Forward, x: torch.Tensor,
              args: tuple, kwargs: dict) -> Any:
        if role == "attn" and self.scored["influence"] and plain_call(role, args, kwargs):
            out, probs = attention_with_map(attn, x)
            layer["influence"] = probs.sum(1)
            return out
        if role == "cross" and self.scored["entropy"] and plain_call(role, args, kwargs):
            out, layer["entropy"] = cross_attention_entropy(attn, x, kwargs["encoder_hidden_states"],
                                                            kwargs.get("attention_mask"))
            return out
        return inner(x, *args, **kwargs)

    def _partial(self, role: str, attn: nn.Module, layer: dict[Any, Any], inner: Forward, x: torch.Tensor,
                 idx: torch.Tensor, rows: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """The sub-layer's output for the chosen tokens only, (B, M, C)."""
        batch, tokens, channels = x.shape
        chosen = x.reshape(batch * tokens, channels).index_select(0, rows).view(batch, idx.shape[1], channels)
        if role == "attn":
            if plain_call(role, args, kwargs):
                return attend_queries(attn, x, chosen)
            full = inner(x, *args, **kwargs)  # a masked or customised self-attention: compute it all, keep the rows
            return full.reshape(batch * tokens, -1).index_select(0, rows)
        if role == "cross" and "entropy" in layer and plain_call(role, args, kwargs):
            out, entropy = cross_attention_entropy(attn, chosen, kwargs["encoder_hidden_states"],
                                                   kwargs.get("attention_mask"))
            layer["entropy"].view(-1)[rows] = entropy.flatten()
            return out
        return inner(chosen, *args, **kwargs)

    def _score(self, block: TokenBlock, layer: dict[Any, Any], stale: torch.Tensor) -> torch.Tensor:
        """The caching score of every token (B, N): higher is recomputed first."""
        v = self.values
        score = stale * (v["staleness"] / v["interval"])
        for key in ("influence", "entropy"):
            if v[key] and key in layer:
                score = score + v[key] * minmax(layer[key])
        batch, tokens = score.shape
        if self._ctx.branch == "batched" and batch % 2 == 0:
            score = score.view(2, batch // 2, tokens).mean(0).repeat(2, 1)
        if v["bonus"]:
            score = spatial_bonus(score, self._cells(block, tokens), v["bonus"])
        return score

    def _cells(self, block: TokenBlock, tokens: int) -> torch.Tensor:
        h, w = self.grid(block, tokens)
        if (h, w) not in self.cells:
            self.cells[h, w] = grid_cells(h, w, self.values["grid"], self.adapter.device)
        return self.cells[h, w]
