"""DistriFusion's activation exchange: a layer's per-rank parts of an activation, all-gathered between ranks —
fresh and waited for during the synchronous warm-up, a step stale afterwards so the communication overlaps the
computation."""

from __future__ import annotations

import torch
import torch.distributed as dist


class Exchange:
    """One layer's exchange. ``parts(fresh, sync)`` returns every rank's part of the layer's activation, in rank
    order, this rank's own being ``fresh``:

    - synchronous: gathered now (every rank waits) — exact;
    - stale: the other ranks' parts as gathered at this layer's previous call, while this call's fresh part is
      sent without waiting (``async_op``); the next call waits for it, by which time the rest of a step has run.

    The first call after ``reset`` (a new image, or a shape change) is always synchronous: there is nothing stale
    to use. ``group``: the ranks sharing one image (None: all). Every rank calls its layers in the same order, so
    the collectives pair up. ``sent`` counts the bytes this rank contributed (the cost model's communication,
    measured).
    """

    def __init__(self, rank: int, world: int, group: dist.ProcessGroup | None = None) -> None:
        self.rank, self.world, self.group = rank, world, group
        self.previous: list[torch.Tensor] | None = None
        self.incoming: list[torch.Tensor] = []
        self.pending: dist.Work | None = None
        self.sent = 0

    def parts(self, fresh: torch.Tensor, sync: bool) -> list[torch.Tensor]:
        self._receive()
        fresh = fresh.contiguous()
        self.sent += fresh.numel() * fresh.element_size()
        stale = self.previous is not None and self.previous[0].shape == fresh.shape
        if sync or not stale:
            gathered = [torch.empty_like(fresh) for _ in range(self.world)]
            dist.all_gather(gathered, fresh, group=self.group)
            self.previous = gathered
            return gathered
        parts = list(self.previous)  # type: ignore[arg-type]
        parts[self.rank] = fresh
        self.incoming = [torch.empty_like(fresh) for _ in range(self.world)]
        self.pending = dist.all_gather(self.incoming, fresh, group=self.group, async_op=True)
        return parts

    def _receive(self) -> None:
        """Wait for the gather the previous call started; its parts become the stale ones."""
        if self.pending is not None:
            self.pending.wait()
            self.previous, self.pending = self.incoming, None

    def reset(self) -> None:
        """Finish what is in flight (every rank started it) and forget the stale parts."""
        self._receive()
        self.previous = None
