"""Gloo ranks (two by default) spawned from a test: each joins the process group, runs ``target()`` and saves
what it returns; the test reads every rank's results."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, target: Callable[[], Any], store: str, out: str, world: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        results = target()
    finally:
        dist.destroy_process_group()
    torch.save(results, out.format(rank=rank))


def on_ranks(target: Callable[[], Any], folder: Path, world: int = 2) -> list[Any]:
    """``target()``'s result on each of ``world`` ranks, in rank order (``target`` must be a module-level
    function)."""
    out = str(folder / "rank{rank}.pt")
    mp.spawn(_worker, args=(target, str(folder / "store"), out, world), nprocs=world, join=True)
    return [torch.load(out.format(rank=r)) for r in range(world)]
