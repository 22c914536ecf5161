"""Precision methods against the batch size: one denoiser forward, fp32 vs each recipe, per batch.

The bundled models are 1-3 M parameters: at the bench's batch (one image, two rows with CFG) a forward is
~25 ms of mostly Python and dispatch, so no kernel can show its rate there. This script times the denoiser
alone on the pipeline's own inputs (captured from a one-step call with ``--prompts`` prompts) for several
batch sizes: where a bf16 or int8 speed-up appears, and where it does not. Each recipe is applied to its own
copy of the pipeline once (one-time packing is not timed); fp32 and the variant alternate, median of ``--reps``.
PSNR is not reported here: ``quant_peers.py`` measures it on whole generations.

    HF_HUB_OFFLINE=1 python benchmarks/quant_batch.py --model tiny-sd --prompts 1,8,32 --recipes "bf16;int8"
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from quant_peers import first_denoiser_call

import effdiff
from effdiff.adapters import denoiser_attr
from effdiff.eval.cost import time_alternating
from effdiff.host import simd


def captured_inputs(pipe: Any, prompts: int) -> tuple[tuple, dict]:
    """The denoiser's inputs at the first step of a guided call with ``prompts`` prompts."""
    def run() -> None:
        with torch.no_grad():
            pipe(["a handwritten seven"] * prompts, num_inference_steps=1, guidance_scale=4.0, output_type="pt",
                 generator=torch.Generator().manual_seed(0))

    return first_denoiser_call(pipe, run)


def forward(pipe: Any, args: tuple, kwargs: dict) -> Any:
    denoiser = getattr(pipe, denoiser_attr(pipe))

    def run() -> Any:
        with torch.no_grad():
            return denoiser(*args, **kwargs)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-sd")
    parser.add_argument("--prompts", default="1,8,32", help="comma-separated prompt counts (rows = 2 x prompts)")
    parser.add_argument("--recipes", default="bf16;int8", help="recipes separated by ';' (a recipe has commas)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results/quant/quant_batch.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    pipe = effdiff.load(args.model)
    variants = {}
    for recipe in args.recipes.split(";"):
        own = copy.deepcopy(pipe)
        effdiff.accelerate(own, recipe)
        variants[recipe] = own
    rows = []
    for prompts in (int(p) for p in args.prompts.split(",")):
        inputs = captured_inputs(pipe, prompts)
        for recipe, own in variants.items():
            base, var = time_alternating(forward(pipe, *inputs), forward(own, *inputs), reps=args.reps)
            row = {"model": args.model, "recipe": recipe, "prompts": prompts, "rows": 2 * prompts,
                   "fp32_ms": round(base.median * 1e3, 2), "variant_ms": round(var.median * 1e3, 2),
                   "speedup": round(base.median / var.median, 3)}
            rows.append(row)
            print(f"  {args.model} {recipe:24s} prompts {prompts:3d}: fp32 {row['fp32_ms']:8.1f} ms  "
                  f"{row['variant_ms']:8.1f} ms  {row['speedup']:.2f}x", flush=True)
    out = Path(args.out)
    existing = json.loads(out.read_text()) if out.exists() else {}
    existing[args.model] = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
                            "machine": f"{platform.machine()} threads={torch.get_num_threads()}",
                            "cpu_simd": simd(),
                            "args": vars(args), "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(existing, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
