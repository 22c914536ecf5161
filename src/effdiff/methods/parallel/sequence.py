"""Sequence-parallel attention over ranks: Ulysses (heads exchanged all-to-all) and ring (keys and values passed
around), and their hybrid — the attention of a token sequence split between ranks, exact up to float rounding.

Ranks may hold different numbers of tokens (an MMDiT's text of 333 tokens does not halve): every exchange sizes
its parts from ``Mesh.tokens``, the count each rank holds, which the splitting layers record per call."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from effdiff.eval.cost import sdpa_arguments
from effdiff.methods.parallel.base import new_groups
from effdiff.registry import RecipeError


@dataclass
class Mesh:
    """This rank's place on a ``ring × ulysses`` grid of the world's ranks (rank = ring index × ulysses + ulysses
    index, as USP lays them out: the all-to-all groups are neighbours, which on a multi-GPU node share the fastest
    links). ``rank``: this rank's index in its branch; ``ulysses_group`` / ``ring_group``: the process groups of
    its row and column (the branch's group where one spans the branch; unused for a size of 1). ``sent``: bytes
    this rank has sent to others (measured communication, for the cost model). ``streams``: each split stream's
    (image, text) token count per rank of the branch, recorded by the layers that split them in this call."""

    ring: int
    ulysses: int
    rank: int
    ulysses_group: dist.ProcessGroup | None
    ring_group: dist.ProcessGroup | None
    sent: int = 0
    streams: dict[str, list[int]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.ring * self.ulysses

    def tokens(self, local: int) -> list[int]:
        """Tokens each rank of the branch holds (the streams' shares summed); ``local`` on every rank where no
        stream was recorded (sequence attention called directly)."""
        if not self.streams:
            return [local] * self.size
        return [sum(counts) for counts in zip(*self.streams.values(), strict=True)]

    def ulysses_tokens(self, local: int) -> list[int]:
        """Tokens held by each member of this rank's Ulysses group."""
        start = self.ring_index * self.ulysses
        return self.tokens(local)[start:start + self.ulysses]

    def ring_tokens(self, local: int) -> list[int]:
        """Tokens each ring member holds after its Ulysses exchange: its Ulysses group's total."""
        held = self.tokens(local)
        return [sum(held[i * self.ulysses:(i + 1) * self.ulysses]) for i in range(self.ring)]

    @property
    def ulysses_index(self) -> int:
        return self.rank % self.ulysses

    @property
    def ring_index(self) -> int:
        return self.rank // self.ulysses


def make_mesh(branches: list[list[int]], rank: int, ring: int, branch_group: dist.ProcessGroup | None) -> Mesh:
    """This rank's ``ring × (P / ring)`` grid inside its branch (``branches``: each group of ``P`` global ranks that
    shares one image — the whole world, or one CFG branch beside ``cfgparallel``; ``branch_group`` the process group
    of this rank's, None for the whole world). Every rank creates every branch's row and column groups, in the same
    order (``new_group`` is collective over the world)."""
    size = len(branches[0])
    ulysses = size // ring
    rows = [b[r * ulysses:(r + 1) * ulysses] for b in branches for r in range(ring)]
    columns = [b[u::ulysses] for b in branches for u in range(ulysses)]
    ulysses_group = new_groups(rows, rank) if 1 < ulysses < size else branch_group
    ring_group = new_groups(columns, rank) if 1 < ring < size else branch_group
    index = next(b for b in branches if rank in b).index(rank)
    return Mesh(ring, ulysses, index, ulysses_group, ring_group)


def even_shares(total: int, parts: int) -> list[int]:
    """``total`` split as evenly as it goes, the first parts taking one more when ``parts`` does not divide it: the
    heads per rank of a Ulysses group (DeepSpeed-Ulysses needs them to divide; an uneven all-to-all does not) and
    a stream's tokens per rank."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def heads_to_ranks(qkv: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """Ulysses' first all-to-all: (S, B, H, n, D) with this rank's ``n`` tokens of every head → (S, B, h, Σn, D)
    with the Ulysses group's tokens (in rank order) of this rank's ``h`` heads (``S`` stacks q, k, v so one
    exchange moves all three)."""
    stacks, batch, heads, tokens, dim = qkv.shape
    counts = even_shares(heads, mesh.ulysses)
    own = counts[mesh.ulysses_index]
    arriving = mesh.ulysses_tokens(tokens)
    row = stacks * batch * dim
    send = torch.cat([part.reshape(-1) for part in qkv.split(counts, dim=2)])
    mesh.sent += (send.numel() - row * own * tokens) * send.element_size()
    received = torch.empty(row * own * sum(arriving), dtype=qkv.dtype, device=qkv.device)
    dist.all_to_all_single(received, send, [row * own * n for n in arriving], [row * c * tokens for c in counts],
                           group=mesh.ulysses_group)
    parts = received.split([row * own * n for n in arriving])
    return torch.cat([p.view(stacks, batch, own, n, dim) for p, n in zip(parts, arriving, strict=True)], dim=3)


def ranks_to_heads(out: torch.Tensor, heads: int, mesh: Mesh) -> torch.Tensor:
    """Ulysses' second all-to-all, the inverse: (B, h, Σn, D) of this rank's heads → (B, H, n, D) of its tokens."""
    batch, own, _, dim = out.shape
    arriving = mesh.ulysses_tokens(out.shape[2] // mesh.ulysses)
    mine = arriving[mesh.ulysses_index]
    counts = even_shares(heads, mesh.ulysses)
    send = torch.cat([part.reshape(-1) for part in out.split(arriving, dim=2)])
    mesh.sent += (send.numel() - batch * own * mine * dim) * send.element_size()
    received = torch.empty(batch * heads * mine * dim, dtype=out.dtype, device=out.device)
    dist.all_to_all_single(received, send, [batch * c * mine * dim for c in counts],
                           [batch * own * n * dim for n in arriving], group=mesh.ulysses_group)
    parts = received.split([batch * c * mine * dim for c in counts])
    return torch.cat([p.view(batch, c, mine, dim) for p, c in zip(parts, counts, strict=True)], dim=1)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q`` on one chunk of keys, and each query's log-sum-exp over that chunk (B, H, n, 1):
    what ring attention needs to merge the chunks' partial results exactly. Fused kernels that return the
    log-sum-exp where torch has them — the CPU's flash kernel; CUDA's memory-efficient kernel (untested here: no
    GPU in the session that wrote it) — and written out elsewhere (scores materialised per chunk; at 1,024 tokens
    on the PixArt twin that made ring 0.72× where the fused kernel's Ulysses tied)."""
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        return out.float(), lse.unsqueeze(-1).float()
    if q.device.type == "cuda" and q.dtype in (torch.float32, torch.bfloat16, torch.float16):
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, scale=scale)[:2]
        return out.float(), lse[..., : q.shape[-2]].unsqueeze(-1).float()  # the kernel pads the rows it returns
    return written_out_attention(q, k, v, scale)


def written_out_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_with_lse`` with the scores materialised: any device and dtype, and the reference it is tested
    against."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    return torch.matmul(torch.exp(scores - lse).to(v.dtype), v).float(), lse


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mesh: Mesh) -> torch.Tensor:
    """Ring attention: this rank's queries meet every ring member's keys and values one chunk at a time — the
    chunk in hand is computed while the next arrives from the previous rank (asynchronous send/receive, so the
    transfer hides behind the computation) — and the partial results are merged by their log-sum-exps, which
    gives the whole-sequence softmax exactly (up to float rounding: each rank sums its chunks in its own order)."""
    group = mesh.ring_group
    ring_rank = mesh.ring_index
    after, before = ((i if group is None else dist.get_global_rank(group, i))
                     for i in ((ring_rank + 1) % mesh.ring, (ring_rank - 1) % mesh.ring))
    chunk = torch.stack([k, v]).contiguous()
    sizes = mesh.ring_tokens(k.shape[2] // mesh.ulysses)  # the chunk from ring member i holds sizes[i] tokens
    out = lse = None
    for step in range(mesh.ring):
        requests = []
        if step < mesh.ring - 1:
            shape = list(chunk.shape)
            shape[3] = sizes[(ring_rank - step - 1) % mesh.ring]
            incoming = chunk.new_empty(shape)
            requests = [dist.isend(chunk, after, group=group), dist.irecv(incoming, before, group=group)]
            mesh.sent += chunk.numel() * chunk.element_size()
        part, part_lse = attention_with_lse(q, chunk[0], chunk[1], scale)
        if out is None or lse is None:
            out, lse = part, part_lse
        else:
            merged = torch.logaddexp(lse, part_lse)
            out = out * torch.exp(lse - merged) + part * torch.exp(part_lse - merged)
            lse = merged
        for request in requests:
            request.wait()
        if requests:
            chunk = incoming
    assert out is not None
    return out.to(q.dtype)


def sequence_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                       mesh: Mesh) -> torch.Tensor:
    """Attention of this rank's queries (B, H, n, D) on the whole sequence's keys and values, each rank holding
    ``n`` of the tokens: Ulysses' all-to-all to whole-sequence heads, ring attention across the Ulysses groups, and
    the inverse all-to-all (USP's hybrid; either part alone when the other's size is 1). ``scale`` None: SDPA's
    default, 1/√D. The order of the keys does not matter to attention, so a rank's tokens may be any of the
    sequence's (an MMDiT's text share and image share together)."""
    heads = q.shape[1]
    if mesh.ulysses > 1:
        q, k, v = heads_to_ranks(torch.stack([q, k, v]), mesh)
    if mesh.ring > 1:
        out = ring_attention(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale, mesh)
    else:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return ranks_to_heads(out, heads, mesh) if mesh.ulysses > 1 else out


# Tensor methods written in Python whose body dynamo cannot trace once a mode hands them over (``Tensor.unflatten``
# ends in ``super().unflatten``: a graph break in every FLUX attention under torch.compile), and their builtin twins
TRACEABLE_FORM = {torch.Tensor.unflatten: torch.unflatten}


class WholeSequenceAttention(TorchFunctionMode):
    """Inside an attention module's forward, every ``scaled_dot_product_attention`` call becomes
    ``sequence_attention`` over the ranks — whatever the processor did before it (projections, QK norms, an MMDiT's
    text and image concatenated in either order, rotary tables): so one mechanism serves PixArt's self-attention,
    SD3's and FLUX's joint attention and FLUX's single blocks, and diffusers' processors stay untouched. ``calls``
    counts the replaced calls (zero means the processor computed attention some other way, and the split would be
    silently wrong)."""

    def __init__(self, mesh: Mesh, name: str) -> None:
        super().__init__()
        self.mesh, self.name, self.calls = mesh, name, 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is not F.scaled_dot_product_attention:  # every other op of the attention: straight through
            return TRACEABLE_FORM.get(func, func)(*args, **(kwargs or {}))
        kwargs = sdpa_arguments(args, kwargs)
        q, k, v = kwargs["query"], kwargs["key"], kwargs["value"]
        if (kwargs.get("attn_mask") is not None or kwargs.get("dropout_p", 0.0) or kwargs.get("is_causal")
                or kwargs.get("enable_gqa") or q.dim() != 4 or k.shape[1] != q.shape[1]):
            raise RecipeError(f"{self.name}: an attention with a mask, dropout, causality or grouped heads cannot "
                              "be split by sequence")
        self.calls += 1
        return sequence_attention(q, k, v, kwargs.get("scale"), self.mesh)


def split_stream(mesh: Mesh, stream: str) -> Any:
    """A layer returning a stream's tokens (B, S, C) — the image's patch embedding, an MMDiT's text embedding —
    made to return this rank's contiguous share (as even as it goes), recording every rank's share on the mesh."""

    def make(inner: Any) -> Any:
        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            tokens = inner(*args, **kwargs)
            shares = even_shares(tokens.shape[1], mesh.size)
            if min(shares) == 0:
                raise RecipeError(f"{tokens.shape[1]} {stream} tokens do not go round {mesh.size} ranks")
            mesh.streams[stream] = shares
            start = sum(shares[:mesh.rank])
            return tokens[:, start:start + shares[mesh.rank]]

        return forward

    return make


def gather_stream(mesh: Mesh, stream: str, group: dist.ProcessGroup | None) -> Any:
    """A per-token layer after the last block returning every rank's share of ``stream`` in rank order, the whole
    sequence (shares padded to the largest for the all-gather, then trimmed)."""

    def make(inner: Any) -> Any:
        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            part = inner(*args, **kwargs)
            shares = mesh.streams[stream]
            padded = F.pad(part, (0, 0, 0, max(shares) - part.shape[1])).contiguous()
            parts = [torch.empty_like(padded) for _ in shares]
            dist.all_gather(parts, padded, group=group)
            return torch.cat([p[:, :n] for p, n in zip(parts, shares, strict=True)], dim=1)

        return forward

    return make


def rotary_rows(mesh: Mesh) -> Any:
    """A rotary-embedding layer whose tables (one tensor or a tuple, rows = the text's tokens then the image's)
    cover the whole sequence, made to return the rows of this rank's text share and image share, in the order the
    attention concatenates them."""

    def rows(table: torch.Tensor) -> torch.Tensor:
        image, text = mesh.streams["image"], mesh.streams.get("text", [0] * mesh.size)
        if table.shape[0] != sum(image) + sum(text):
            raise RecipeError(f"a rotary table of {table.shape[0]} rows does not cover the {sum(text)} text and "
                              f"{sum(image)} image tokens")
        text_start, image_start = sum(text[:mesh.rank]), sum(text) + sum(image[:mesh.rank])
        index = torch.cat([torch.arange(text_start, text_start + text[mesh.rank]),
                           torch.arange(image_start, image_start + image[mesh.rank])]).to(table.device)
        return table.index_select(0, index)

    def make(inner: Any) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            out = inner(*args, **kwargs)
            return tuple(rows(t) for t in out) if isinstance(out, tuple) else rows(out)

        return forward

    return make
