"""Sequence-parallel attention over ranks: Ulysses (heads exchanged all-to-all) and ring (keys and values passed
around), and their hybrid — the attention of a token sequence split between ranks, exact up to float rounding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from effdiff.methods.parallel.base import new_groups


@dataclass
class Mesh:
    """This rank's place on a ``ring × ulysses`` grid of the world's ranks (rank = ring index × ulysses + ulysses
    index, as USP lays them out: the all-to-all groups are neighbours, which on a multi-GPU node share the fastest
    links). ``rank``: this rank's index in its branch; ``ulysses_group`` / ``ring_group``: the process groups of
    its row and column (the branch's group where one spans the branch; unused for a size of 1). ``sent``: bytes
    this rank has sent to others (measured communication, for the cost model)."""

    ring: int
    ulysses: int
    rank: int
    ulysses_group: dist.ProcessGroup | None
    ring_group: dist.ProcessGroup | None
    sent: int = 0

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


def head_counts(heads: int, ranks: int) -> list[int]:
    """Heads per rank of a Ulysses group: as even as it goes, the first ranks taking one more when ``ranks`` does
    not divide ``heads`` (DeepSpeed-Ulysses needs it to divide; an uneven all-to-all does not)."""
    return [heads // ranks + (i < heads % ranks) for i in range(ranks)]


def heads_to_ranks(qkv: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """Ulysses' first all-to-all: (S, B, H, n, D) with this rank's ``n`` tokens of every head → (S, B, h, u·n, D)
    with the Ulysses group's ``u·n`` tokens of this rank's ``h`` heads (``S`` stacks q, k, v so one exchange moves
    all three)."""
    stacks, batch, heads, tokens, dim = qkv.shape
    counts = head_counts(heads, mesh.ulysses)
    own = counts[mesh.ulysses_index]
    send = torch.cat([part.reshape(-1) for part in qkv.split(counts, dim=2)])
    mesh.sent += (send.numel() - stacks * batch * own * tokens * dim) * send.element_size()
    received = torch.empty(mesh.ulysses * stacks * batch * own * tokens * dim, dtype=qkv.dtype, device=qkv.device)
    dist.all_to_all_single(received, send, [stacks * batch * own * tokens * dim] * mesh.ulysses,
                           [stacks * batch * c * tokens * dim for c in counts], group=mesh.ulysses_group)
    parts = received.view(mesh.ulysses, stacks, batch, own, tokens, dim)
    return torch.cat(list(parts), dim=3)


def ranks_to_heads(out: torch.Tensor, heads: int, mesh: Mesh) -> torch.Tensor:
    """Ulysses' second all-to-all, the inverse: (B, h, u·n, D) of this rank's heads → (B, H, n, D) of its tokens."""
    batch, own, tokens, dim = out.shape
    share = tokens // mesh.ulysses
    counts = head_counts(heads, mesh.ulysses)
    send = torch.cat([part.reshape(-1) for part in out.split(share, dim=2)])
    mesh.sent += send.numel() * (mesh.ulysses - 1) // mesh.ulysses * send.element_size()
    received = torch.empty(batch * heads * share * dim, dtype=out.dtype, device=out.device)
    dist.all_to_all_single(received, send, [batch * c * share * dim for c in counts],
                           [batch * own * share * dim] * mesh.ulysses, group=mesh.ulysses_group)
    parts = received.split([batch * c * share * dim for c in counts])
    return torch.cat([p.view(batch, c, share, dim) for p, c in zip(parts, counts, strict=True)], dim=1)


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
    out = lse = None
    for step in range(mesh.ring):
        requests = []
        if step < mesh.ring - 1:
            incoming = torch.empty_like(chunk)
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


def sequence_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mesh: Mesh) -> torch.Tensor:
    """Attention of this rank's queries (B, H, n, D) on the whole sequence's keys and values, each rank holding
    ``n`` of the tokens: Ulysses' all-to-all to whole-sequence heads, ring attention across the Ulysses groups, and
    the inverse all-to-all (USP's hybrid; either part alone when the other's size is 1)."""
    heads = q.shape[1]
    if mesh.ulysses > 1:
        q, k, v = heads_to_ranks(torch.stack([q, k, v]), mesh)
    if mesh.ring > 1:
        out = ring_attention(q, k, v, scale, mesh)
    else:
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return ranks_to_heads(out, heads, mesh) if mesh.ulysses > 1 else out
