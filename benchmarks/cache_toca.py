"""ToCa (token-wise caching) vs FORA (whole-layer caching) on tiny-dit, and speed at PixArt-XL-2 scale, one process.

Baseline: DDIM 50 steps, guidance 4, the two prompts of ``cache_peers.py`` in one call. Each variant is
timed alternating with the baseline (median of ``--reps``, warm-up first) and compared with the baseline's
images (PSNR/SSIM; label ``trained``: tiny-dit's weights are trained). ``flop_fraction`` = variant FLOPs /
baseline FLOPs of one call (``count_flops``, CPU attention counted), so FORA and ToCa can be compared at
the same compute; ``cached_calls`` = denoiser calls that reused something. ``--only pixart``: the
random-weight PixArt-XL-2 twin at 256 px, 20 steps (label ``speed-only``: its PSNR means nothing).

    PYTHONPATH=src HF_HUB_OFFLINE=1 flock /tmp/effdiff-heavy.lock python benchmarks/cache_toca.py [--reps 3]
    ... python benchmarks/cache_toca.py --only pixart --twin-prompts 1 [--flops]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from cache_peers import PROMPTS, section

TINY = [
    ("fora interval 2", "effdiff:fora:interval=2"),
    ("fora interval 3", "effdiff:fora:interval=3"),
    ("fora interval 5", "effdiff:fora:interval=5"),
    ("toca interval 3, ratio 0.1", "effdiff:toca:interval=3,ratio=0.1"),
    ("toca interval 3, ratio 0.3", "effdiff:toca:interval=3,ratio=0.3"),
    ("toca interval 5, ratio 0.1", "effdiff:toca:interval=5,ratio=0.1"),
    ("toca interval 5, ratio 0.3", "effdiff:toca:interval=5,ratio=0.3"),
    ("toca interval 3, ratio 0.3, self-attn", "effdiff:toca:interval=3,ratio=0.3,attn=1,influence=1"),
    ("toca interval 3, ratio 0.3, random-like", "effdiff:toca:interval=3,ratio=0.3,entropy=0,bonus=0"),
]
TWIN = [
    ("fora interval 3", "effdiff:fora:interval=3"),
    ("toca interval 3, ratio 0.3", "effdiff:toca:interval=3,ratio=0.3"),
    ("toca interval 5, ratio 0.3", "effdiff:toca:interval=5,ratio=0.3"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--only", choices=("dit", "pixart"), default="dit")
    parser.add_argument("--twin-steps", type=int, default=20)
    parser.add_argument("--twin-prompts", type=int, default=len(PROMPTS), choices=range(1, len(PROMPTS) + 1))
    parser.add_argument("--variants", default="", help="comma-separated substrings: run only matching variants")
    parser.add_argument("--flops", action="store_true", help="--only pixart: also count FLOPs (one more call each)")
    parser.add_argument("--out", default="benchmarks/results/cache-toca/cache_toca.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.time()
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {"rows": []}
    result.update(benchmark="cache_toca", when=time.strftime("%Y-%m-%d %H:%M:%S"), torch=torch.__version__,
                  machine=f"{platform.machine()} threads={torch.get_num_threads()}", guidance=4.0, reps=args.reps)
    only = [w for w in args.variants.split(",") if w] or None
    if args.only == "dit":
        rows = section("ToCa vs FORA", "tiny-dit", args.steps, TINY, args.reps, only=only)
        label = "trained"
    else:
        rows = section("ToCa vs FORA at PixArt-XL-2 scale", "pixart-alpha-arch", args.twin_steps, TWIN, args.reps,
                       {"height": 256, "width": 256}, flops=args.flops, only=only, prompts=PROMPTS[:args.twin_prompts])
        label = "speed-only"
    for row in rows:
        row["labels"] = [label]
        if "flop_ratio" in row:
            row["flop_fraction"] = round(1 / row["flop_ratio"], 3)
    keep = {(r["model"], r["variant"]) for r in rows}
    result["rows"] = [r for r in result["rows"] if (r["model"], r["variant"]) not in keep] + rows
    result["seconds"] = round(time.time() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\n{'model':18s} {'variant':40s} {'speedup':>8s} {'flops':>6s} {'psnr':>7s} {'ssim':>6s} {'nfe':>4s} "
          f"{'cached':>6s} {'spread':>6s}")
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['model']:18s} {r['variant']:40s} ERROR {r['error'][:70]}")
            continue
        print(f"{r['model']:18s} {r['variant']:40s} {r['speedup']:8.2f} {r.get('flop_fraction', float('nan')):6.3f} "
              f"{r['psnr']:7.2f} {r['ssim']:6.3f} {r['nfe']:4d} {r.get('cached_calls', 0):6d} {r['spread']:6.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
