"""Issue 20's one-GPU check: the parallel methods' own code with CUDA tensors, two processes sharing one GPU. NCCL
refuses two ranks on one device, so the ranks talk over gloo (which stages CUDA tensors through the host where it
must); each recipe's image is compared with the same image made in one process on the same GPU, and a method
that fails is recorded with its error, so one run reports every method. Correctness only: two processes on one
GPU are not a speed measurement.

    HF_HUB_OFFLINE=1 torchrun --standalone --nproc_per_node=2 benchmarks/gpu_parallel_check.py [--device cuda]
        [--out benchmarks/results/gpu_parallel_check.json]

``--device cpu`` runs the same script here (how it was checked before a GPU session).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

import torch
import torch.distributed as dist

import effdiff
from effdiff.zoo.load import load

RECIPES = {"tiny-sd": ("cfgparallel", "distrifusion:exchange=sync", "distrifusion"),
           "tiny-dit": ("cfgparallel", "distrifusion:exchange=sync", "distrifusion", "pipefusion:patches=1",
                        "pipefusion", "seqparallel", "seqparallel:ring=2")}


def image(pipe, device: str) -> torch.Tensor:
    generator = torch.Generator(device).manual_seed(0)
    out = pipe(["digit 3", "digit 7"], num_inference_steps=8, generator=generator, output_type="pt")
    return out.images.float().cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="benchmarks/results/gpu_parallel_check.json")
    args = parser.parse_args()
    # both ranks on one GPU: NCCL would refuse the duplicate device. A short timeout: a method that fails on one
    # rank only leaves the other in a collective, and the run must go on to report it
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()
    rows = []
    for model, recipes in RECIPES.items():
        pipe = load(model).to(args.device)
        pipe.set_progress_bar_config(disable=True)
        single = image(pipe, args.device)
        for recipe in recipes:
            row = {"model": model, "recipe": recipe}
            try:
                effdiff.accelerate(pipe, recipe)
                row["max_abs_diff"] = float((image(pipe, args.device) - single).abs().max())
            except Exception as exc:  # recorded: the check's job is to say which methods run on the device
                row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            finally:
                if getattr(pipe, "effdiff", None) is not None:
                    pipe.effdiff.remove()
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
    if rank == 0:
        result = {"command": "HF_HUB_OFFLINE=1 torchrun --standalone --nproc_per_node=2 "
                             f"benchmarks/gpu_parallel_check.py --device {args.device}",
                  "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.machine(),
                  "torch": torch.__version__, "world": int(os.environ.get("WORLD_SIZE", 1)), "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
