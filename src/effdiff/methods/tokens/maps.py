"""Token maps: reduce a (B, N, C) token sequence to (B, M, C) and copy the result back to N tokens.

Both token methods are one map each: ToMe averages merged tokens into their destination and copies the
destination's output back to every member; AT-EDM keeps the important tokens and copies each pruned
position from its most similar kept token. Everything is expressed as row indices into the flattened
``(B * N, C)`` tensor, so reducing is one ``index_select`` (plus one ``index_add_`` for merges) and
restoring is one ``index_select``: no per-token Python, no zero-filled buffers, no scatter chains.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class TokenMap:
    """Row indices that shrink a token sequence and grow it back.

    ``keep``: rows of ``x.reshape(B*N, C)`` forming the reduced sequence (B*M rows). ``src``/``into``:
    rows averaged into reduced rows (merges; empty for pruning), ``scale`` the per-row 1/(members) of the
    reduced sequence's merge targets. ``restore``: for every original token, the reduced row it reads.
    """

    batch: int
    tokens: int
    kept: int
    keep: torch.Tensor
    restore: torch.Tensor
    src: torch.Tensor | None = None
    into: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    merged_from: int = 0  # first reduced row that may receive merges (rows before it never do)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, M, C): kept rows, with merged rows averaged into their destination."""
        flat = x.reshape(self.batch * self.tokens, x.shape[-1])
        out = flat.index_select(0, self.keep)
        if self.src is not None and self.src.numel():
            out.index_add_(0, self.into, flat.index_select(0, self.src))
            view = out.view(self.batch, self.kept, -1)
            view[:, self.merged_from:].mul_(self.scale.to(out.dtype))
        return out.view(self.batch, self.kept, x.shape[-1])

    def positions(self) -> torch.Tensor:
        """(B, M): the original position of every reduced row (a merge destination's for merged rows)."""
        offsets = _offsets(self.batch, self.tokens, self.keep.device)
        return self.keep.view(self.batch, self.kept) - offsets

    def expand(self, y: torch.Tensor) -> torch.Tensor:
        """(B, M, C) -> (B, N, C): every original token reads its reduced row."""
        flat = y.reshape(self.batch * self.kept, y.shape[-1])
        return flat.index_select(0, self.restore).view(self.batch, self.tokens, y.shape[-1])


def partition(h: int, w: int, sx: int, sy: int, generator: torch.Generator | None,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe-SD's 2-D stride partition: one dst per full sx×sy cell, every other token is src.

    The dst's place in its cell is drawn from ``generator`` (top-left when ``None``). Rows and columns
    beyond the last full cell (grids not divisible by the stride) are all src, as in ToMe for SD.
    Returns (dst, src) token positions in row-major order.
    """
    hc, wc = h // sy, w // sx
    if generator is None:
        offset = torch.zeros(hc, wc, dtype=torch.long)
    else:
        offset = torch.randint(sx * sy, (hc, wc), generator=generator)
    rows = torch.arange(hc).view(-1, 1) * sy + offset // sx
    cols = torch.arange(wc).view(1, -1) * sx + offset % sx
    dst = (rows * w + cols).flatten()
    is_dst = torch.zeros(h * w, dtype=torch.bool)
    is_dst[dst] = True
    src = (~is_dst).nonzero().flatten()
    return dst.to(device), src.to(device)


def _offsets(batch: int, step: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(batch, device=device) * step).view(-1, 1)


def bipartite(metric: torch.Tensor, dst: torch.Tensor, src: torch.Tensor, r: int) -> TokenMap:
    """ToMe's bipartite soft matching: merge the ``r`` src tokens most similar to some dst into it.

    ``metric`` (B, N, C) is compared by cosine similarity, per batch element, src against dst. Each src
    picks its most similar dst; the ``r`` src with the highest such similarity are averaged into their
    dst (mean over the dst and its members); the rest stay. The reduced sequence is the unmerged src (in
    spatial order) followed by the dst. ``r = 0`` gives a pure permutation: ``expand(reduce(x)) == x``.
    """
    batch, tokens, _ = metric.shape
    device = metric.device
    n_src, n_dst = src.numel(), dst.numel()
    if not 0 <= r <= n_src or (r and not n_dst):
        raise ValueError(f"cannot merge {r} of {n_src} src tokens into {n_dst} dst tokens")
    with torch.no_grad():
        merged = torch.empty(batch, 0, dtype=torch.long, device=device)
        if r:
            a = F.normalize(metric.index_select(1, src), dim=-1)
            b = F.normalize(metric.index_select(1, dst), dim=-1)
            best, best_dst = torch.bmm(a, b.transpose(1, 2)).max(dim=-1)
            merged = best.topk(r, dim=-1, sorted=False).indices
        is_merged = torch.zeros(batch, n_src, dtype=torch.bool, device=device)
        is_merged.scatter_(1, merged, True)
        unmerged = (~is_merged).nonzero()[:, 1].view(batch, n_src - r)
        n_unm = n_src - r
        kept = n_unm + n_dst
        unm_pos = src[unmerged]
        keep = torch.cat([unm_pos, dst.expand(batch, n_dst)], dim=1)
        restore = torch.empty(batch, tokens, dtype=torch.long, device=device)
        restore.scatter_(1, unm_pos, torch.arange(n_unm, device=device).expand(batch, n_unm))
        restore[:, dst] = torch.arange(n_unm, kept, device=device)
        src_rows = into_rows = scale = None
        if r:
            src_pos = src[merged]
            into = n_unm + best_dst.gather(1, merged)
            restore.scatter_(1, src_pos, into)
            members = torch.ones(batch, n_dst, device=device)
            members.scatter_add_(1, into - n_unm, torch.ones_like(into, dtype=members.dtype))
            src_rows = (src_pos + _offsets(batch, tokens, device)).flatten()
            into_rows = (into + _offsets(batch, kept, device)).flatten()
            scale = members.reciprocal().unsqueeze(-1)
    return TokenMap(batch, tokens, kept, keep=(keep + _offsets(batch, tokens, device)).flatten(),
                    restore=(restore + _offsets(batch, kept, device)).flatten(), src=src_rows, into=into_rows,
                    scale=scale, merged_from=n_unm)


def selection(keep_idx: torch.Tensor, source: torch.Tensor, tokens: int) -> TokenMap:
    """Keep ``keep_idx`` (B, K) tokens; every token restores from ``source`` (B, N), an index into the kept."""
    batch, kept = keep_idx.shape
    device = keep_idx.device
    return TokenMap(batch, tokens, kept, keep=(keep_idx + _offsets(batch, tokens, device)).flatten(),
                    restore=(source + _offsets(batch, kept, device)).flatten())
