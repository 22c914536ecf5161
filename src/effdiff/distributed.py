"""The process group effdiff's parallel methods run in: ``torchrun`` (or ``effdiff generate --nproc N``) starts the
ranks, ``init_from_env`` joins them (gloo on a CPU, NCCL on GPUs), every rank runs the same pipeline call and the
parallel method splits the denoiser's work between them. Only rank 0 writes files."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of the process group; (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched() -> bool:
    """True inside a process ``torchrun`` started (its environment names the world)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_from_env(device: str = "cpu") -> tuple[int, int]:
    """Join the process group ``torchrun`` describes in the environment (once); returns (rank, world size)."""
    if launched() and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return world()


def relaunch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``python -m effdiff.cli <argv>`` under ``torchrun`` with ``nproc`` ranks on this machine; its exit code."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "effdiff.cli", *argv]
    return subprocess.call(command)
