"""Issue 20's one-GPU check: the parallel methods' own code with CUDA tensors, two processes sharing one GPU. NCCL
refuses two ranks on one device, so the ranks talk over gloo (which stages CUDA tensors through the host where it
must); each recipe's image is compared with the same image made in one process on the same GPU, and a method
that fails is recorded with its error, so one run reports every method. Correctness only: two processes on one
GPU are not a speed measurement.

Beside the bundled models, the transformers at their real width (``parallel_twins.py``'s: FLUX.1-dev's with
1 double + 2 single blocks, 512 px — the MMDiT rows, text tokens split too — and PixArt-α's, 256 px), one call
in the device's half precision, split by ``seqparallel`` (Ulysses, ring) and under torch.compile (the
transformer compiled first, the common idiom), compared with the same call in one process.

    HF_HUB_OFFLINE=1 torchrun --standalone --nproc_per_node=2 benchmarks/gpu_parallel_check.py [--device cuda]
        [--out benchmarks/results/gpu_parallel_check.json] [--tiny]

``--device cpu`` runs the same script here (how it was checked before a GPU session).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from parallel_twins import Holder, model_and_inputs

import effdiff
from effdiff.zoo.load import load

RECIPES = {"tiny-sd": ("cfgparallel", "distrifusion:exchange=sync", "distrifusion"),
           "tiny-dit": ("cfgparallel", "distrifusion:exchange=sync", "distrifusion", "pipefusion:patches=1",
                        "pipefusion", "seqparallel", "seqparallel:ring=2")}
TWIN_RECIPES = {"flux": ("seqparallel", "seqparallel:ring=2", "compiled+seqparallel"),
                "pixart": ("seqparallel", "seqparallel:ring=2", "distrifusion:exchange=sync")}
TWIN_PX = {"flux": 512, "pixart": 256}


def image(pipe, device: str) -> torch.Tensor:
    generator = torch.Generator(device).manual_seed(0)
    out = pipe(["digit 3", "digit 7"], num_inference_steps=8, generator=generator, output_type="pt")
    return out.images.float().cpu()


def attempt(row: dict, run: Callable[[], float]) -> dict:
    """``row`` with ``run()``'s gap to the one-process output, or the error it raised (the check's job is to say
    which methods run on the device, so one failure must not end the run); printed by rank 0 as it comes."""
    try:
        row["max_abs_diff"] = run()
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"[:500]
    if dist.get_rank() == 0:
        print(json.dumps(row), flush=True)
    return row


def pipeline_gap(pipe: Any, recipe: str, single: torch.Tensor, device: str) -> float:
    try:
        effdiff.accelerate(pipe, recipe)
        return float((image(pipe, device) - single).abs().max())
    finally:
        if getattr(pipe, "effdiff", None) is not None:
            pipe.effdiff.remove()


def twin_gap(holder: Holder, kwargs: dict, whole: torch.Tensor, recipe: str, device: str) -> float:
    """One call of the holder's transformer under ``recipe`` against ``whole``; ``compiled+`` compiles the
    transformer in place first (inductor on a GPU) and accelerates the compiled model."""
    model = holder.transformer
    compiled = recipe.startswith("compiled+")
    if compiled:
        model.compile(backend="inductor" if device.startswith("cuda") else "aot_eager")
    try:
        effdiff.accelerate(holder, recipe.removeprefix("compiled+"))
        with torch.no_grad():
            return float((model(**kwargs)[0].float() - whole).abs().max())
    finally:
        if getattr(holder, "effdiff", None) is not None:
            holder.effdiff.remove()
        if compiled:
            model._compiled_call_impl = None  # what Module.compile set


def twin_rows(device: str, tiny: bool) -> list[dict]:
    """Each real-width transformer's one call split by each of its recipes, in the device's half precision."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    rows = []
    for name, recipes in TWIN_RECIPES.items():
        model, kwargs, _ = model_and_inputs(name, TWIN_PX[name], tiny, flux_blocks=1)
        model = model.to(device, dtype)
        kwargs = {k: v.to(device, dtype if v.is_floating_point() else v.dtype) if torch.is_tensor(v) else v
                  for k, v in kwargs.items()}
        with torch.no_grad():
            whole = model(**kwargs)[0].float()
        holder = Holder(model)
        label = f"{name} twin ({'tiny' if tiny else 'real width'}, {str(dtype).removeprefix('torch.')})"
        rows += [attempt({"model": label, "recipe": recipe},
                         functools.partial(twin_gap, holder, kwargs, whole, recipe, device)) for recipe in recipes]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="benchmarks/results/gpu_parallel_check.json")
    parser.add_argument("--tiny", action="store_true", help="tiny twins: the script end to end in seconds")
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
        rows += [attempt({"model": model, "recipe": recipe},
                         functools.partial(pipeline_gap, pipe, recipe, single, args.device)) for recipe in recipes]
    rows += twin_rows(args.device, args.tiny)
    if rank == 0:
        result = {"command": "HF_HUB_OFFLINE=1 torchrun --standalone --nproc_per_node=2 "
                             f"benchmarks/gpu_parallel_check.py --device {args.device}"
                             + (" --tiny" if args.tiny else ""),
                  "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.machine(),
                  "torch": torch.__version__, "world": int(os.environ.get("WORLD_SIZE", 1)), "rows": rows}
        Path(args.out).write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
