"""Does compression's speed-up hold at real scale? The random-weight twins of SD 1.5's U-Net and PixArt-α's
transformer, compressed by the same code as the bundled models (speed only, never quality: their weights are
random), each compressed model timed per denoiser call against the original in one process, alternating:

- width: Diff-Pruning's structural pruning to ``--macs`` (magnitude importance — Taylor needs trained weights);
- blocks: BK-SDM's base/small/tiny on U-Nets, and a DiT keeping every other block (ditprune's 1:2 pattern; which
  block of each pair is kept does not change the cost).

    HF_HUB_OFFLINE=1 python benchmarks/compress_twins.py [--twins sd15-arch pixart-alpha-arch] [--macs 0.5]
        [--device cpu|cuda] [--dtype float32|float16|bfloat16]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import effdiff
from effdiff.adapters import adapter_for, find_denoiser
from effdiff.compress.prune import call_macs, prune_to_macs
from effdiff.compress.structure import BlockPlan, apply_block_plan
from effdiff.eval.cost import time_alternating
from effdiff.host import cpu_description
from effdiff.patches import PatchLog


def block_removed(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The model's block-removed copies: BK-SDM's variants for a U-Net, every other block kept for a DiT."""
    adapter = adapter_for(model)
    if adapter.kind == "unet":
        plans = {}
        for variant in ("base", "small", "tiny"):
            try:
                plans[f"bksdm:variant={variant}"] = adapter.block_removal(variant)
            except ValueError as exc:  # a variant this U-Net's layout has no room for
                print(f"  bksdm:variant={variant}: {exc}", flush=True)
    else:
        names = [ref.name for ref in adapter.blocks()]
        container = names[0].rpartition(".")[0]
        plans = {"ditprune 1:2 (depth only)": BlockPlan(kept={container: list(range(0, len(names), 2))})}
    out = {}
    for name, plan in plans.items():
        copied = copy.deepcopy(model)
        apply_block_plan(PatchLog(), copied, plan)  # the log is dropped: the copy stays compressed
        out[name] = copied
    return out


def measure(twin: str, args: argparse.Namespace) -> list[dict]:
    """Compress one twin every way and time a call of each against the original, alternating."""
    dtype = getattr(torch, args.dtype)
    model = find_denoiser(effdiff.load(twin)).float().eval()
    full_macs, full_params = call_macs(model), sum(p.numel() for p in model.parameters())
    started = time.perf_counter()
    pruned, facts = prune_to_macs(model, args.macs, "magnitude", trials=args.trials)
    variants = {f"diffpruning:macs={args.macs:g} (width, magnitude)": pruned, **block_removed(model)}
    print(f"{twin}: compressed {len(variants)} ways in {time.perf_counter() - started:.0f} s", flush=True)
    model = model.to(args.device, dtype).eval().requires_grad_(False)
    call = {k: v.to(args.device, dtype) if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in adapter_for(model).example_call(2).items()}
    rows = []
    for name, variant in variants.items():
        macs, params = call_macs(variant) / full_macs, sum(p.numel() for p in variant.parameters()) / full_params
        variant = variant.to(args.device, dtype).eval().requires_grad_(False)
        with torch.no_grad():
            original, smaller = time_alternating(lambda: model(**call), lambda v=variant: v(**call),
                                                 reps=args.reps)
        rows.append({"twin": twin, "class": type(model).__name__, "variant": name, "macs_fraction": macs,
                     "params_fraction": params, "call_seconds_original": original.median,
                     "call_seconds_compressed": smaller.median, "call_speedup": original.median / smaller.median,
                     "spread": [original.spread, smaller.spread]})
        print(f"  {name:36s} MACs {macs:.1%}  params {params:.1%}  one call (batch 2) {original.median:.3f} s -> "
              f"{smaller.median:.3f} s = {rows[-1]['call_speedup']:.2f}x", flush=True)
        variant.to("cpu")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--twins", nargs="+", default=["sd15-arch", "pixart-alpha-arch"])
    parser.add_argument("--macs", type=float, default=0.5)
    parser.add_argument("--trials", type=int, default=7, help="bisection trials on the channel ratio")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--out", default="benchmarks/results/compress_twins.json")
    args = parser.parse_args()
    rows = [row for twin in args.twins for row in measure(twin, args)]
    device = torch.cuda.get_device_name() if args.device == "cuda" else cpu_description()
    result = {"benchmark": "compress_twins", "when": time.strftime("%Y-%m-%d %H:%M:%S"), "device": device,
              "dtype": args.dtype, "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
