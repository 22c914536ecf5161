"""Patch-parallel quality on the bundled models, two gloo ranks on this CPU: each image made with its patches on
two ranks (``distrifusion``, stale activations after the synchronous warm-up) against the same image made in one
piece, and the naive patch split (``distrifusion:exchange=none``, no interaction between patches) beside it.
``--rows`` takes any parallel recipes instead (``pipefusion`` on tiny-dit: ``--models tiny-dit --rows pipefusion
pipefusion:patches=4 --out benchmarks/results/parallel_quality_pipefusion.json``; sequence parallelism: ``--rows
seqparallel seqparallel:ring=2 --out benchmarks/results/parallel_quality_seqparallel.json``).

The one-piece reference is made by the same two ranks, each making half of the images (data parallel), so its
wall time is the honest alternative to splitting every image. PSNR per image against the reference (mean and
worst), FID/KID against the held-out digits and prompt accuracy (the quality bar's prompts and seeds) — every row
of a model in one run, on the same seeds.

    HF_HUB_OFFLINE=1 torchrun --standalone --nproc_per_node=2 benchmarks/parallel_quality.py \\
        [--per-digit 100] [--steps 20] [--models tiny-sd tiny-dit] [--out benchmarks/results/parallel_quality.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

import effdiff
from effdiff.distributed import init_from_env
from effdiff.eval.fidelity import psnr_per_image
from effdiff.host import cpu_description, simd
from effdiff.zoo.evaluate import generate_eval_samples, score_samples

ROWS = ("distrifusion", "distrifusion:warmup=1", "distrifusion:exchange=none")


def timed_samples(pipe, args, share: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Images in [0, 1] and their digits; the wall time from the first rank's start to the last rank's end."""
    dist.barrier()
    start = time.perf_counter()
    images, digits = generate_eval_samples(pipe, per_digit=args.per_digit, steps=args.steps, guidance=4.0,
                                           share=share)
    dist.barrier()
    return (images + 1) / 2, digits, time.perf_counter() - start


def gathered_images(part: torch.Tensor, world: int) -> torch.Tensor:
    parts = [torch.empty_like(part) for _ in range(world)]
    dist.all_gather(parts, part.contiguous())
    return torch.cat(parts)


def model_rows(name: str, args, rank: int, world: int) -> list[dict]:
    pipe = effdiff.load(name)
    part, digits, seconds = timed_samples(pipe, args, share=(rank, world))
    reference = gathered_images(part, world)
    digits = torch.arange(10).repeat_interleave(args.per_digit)
    rows = [{"model": name, "row": f"one piece (data parallel: each rank makes {len(part)} images)",
             "seconds": seconds, **score_samples(reference, digits)}]
    for recipe in args.rows:
        effdiff.accelerate(pipe, recipe)
        images, _, seconds = timed_samples(pipe, args)
        sent = pipe.effdiff.methods[0].sent_bytes
        pipe.effdiff.remove()
        psnr = psnr_per_image(images, reference)
        rows.append({"model": name, "row": recipe, "seconds": seconds, "psnr_mean": float(psnr.mean()),
                     "psnr_min": float(psnr.min()), "sent_mb_per_image": sent / len(images) / 1e6,
                     **score_samples(images, digits)})
        if rank == 0:
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-digit", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--models", nargs="+", default=["tiny-sd", "tiny-dit"])
    parser.add_argument("--rows", nargs="+", default=list(ROWS))
    parser.add_argument("--out", default="benchmarks/results/parallel_quality.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank, world = init_from_env()
    if world < 2:
        raise SystemExit("run under torchrun with 2 or more ranks (see the docstring)")
    rows = [row for name in args.models for row in model_rows(name, args, rank, world)]
    if rank == 0:
        result = {"command": "HF_HUB_OFFLINE=1 torchrun --standalone --nproc_per_node=2 benchmarks/parallel_quality.py "
                             f"--per-digit {args.per_digit} --steps {args.steps} --models {' '.join(args.models)} "
                             f"--rows {' '.join(args.rows)} --out {args.out}",
                  "ranks": world, "threads_per_rank": torch.get_num_threads(), "steps": args.steps,
                  "guidance": 4.0, "machine": cpu_description(),
                  "cpu_flags": simd(),
                  "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
