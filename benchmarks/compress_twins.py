"""Does pruning's speed-up hold at real scale? The random-weight twins of SD 1.5's U-Net and PixArt-α's
transformer, pruned by the same code to the same MAC budget (magnitude importance: their weights are random, so
this is speed only, never quality), timed per denoiser call against the original in one process, alternating.

    HF_HUB_OFFLINE=1 python benchmarks/compress_twins.py [--twins sd15-arch pixart-alpha-arch] [--macs 0.5]
        [--device cpu|cuda] [--dtype float32|float16|bfloat16]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import effdiff
from effdiff.adapters import adapter_for
from effdiff.compress.prune import prune_to_macs
from effdiff.eval.cost import time_alternating


def measure(twin: str, args: argparse.Namespace) -> dict:
    """Prune one twin to the budget and time a call of each, alternating."""
    dtype = getattr(torch, args.dtype)
    started = time.perf_counter()
    model = effdiff.load(twin).denoiser.float().eval()
    pruned, facts = prune_to_macs(model, args.macs, "magnitude", trials=args.trials)
    prune_seconds = time.perf_counter() - started
    model, pruned = (m.to(args.device, dtype).eval().requires_grad_(False) for m in (model, pruned))
    call = {k: v.to(args.device, dtype) if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in adapter_for(model).example_call(2).items()}
    with torch.no_grad():
        original, smaller = time_alternating(lambda: model(**call), lambda: pruned(**call), reps=args.reps)
    row = {"twin": twin, "class": type(model).__name__, **facts, "prune_seconds": round(prune_seconds, 1),
           "call_seconds_original": original.median, "call_seconds_pruned": smaller.median,
           "call_speedup": original.median / smaller.median, "spread": [original.spread, smaller.spread]}
    print(f"{twin}: MACs {facts['macs_fraction']:.1%}, params {facts['params_fraction']:.1%}, one call (batch 2) "
          f"{original.median:.3f} s -> {smaller.median:.3f} s = {row['call_speedup']:.2f}x "
          f"(pruning took {prune_seconds:.0f} s)", flush=True)
    return row


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
    rows = [measure(twin, args) for twin in args.twins]
    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    result = {"benchmark": "compress_twins", "when": time.strftime("%Y-%m-%d %H:%M:%S"), "device": device,
              "dtype": args.dtype, "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
