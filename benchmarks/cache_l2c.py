"""Faster Diffusion on tiny-sd and Learning-to-Cache on tiny-dit (vs FORA at the same cached fraction), one process.

Baseline: DDIM 50 steps, guidance 4, the two prompts of ``cache_peers.py`` in one call. Each variant is
timed alternating with the baseline (median of ``--reps``, warm-up first) and compared with the baseline's
images (PSNR/SSIM); ``flop_ratio`` = baseline FLOPs / variant FLOPs (``count_flops``), ``efficiency`` =
speed-up / flop_ratio; ``cached_calls`` = denoiser calls that reused something. L2C routers are trained
(or loaded from ``~/.cache/effdiff``) before timing; their training time is recorded (label ``trained``).
``fraction`` is the share of all (step, layer) slots of the attention/MLP layers served from cache: FORA
interval N caches (N - 1) / N of them, so ``l2c:period=3,fraction=0.5`` spends the compute of
``fora:interval=2`` but lets the router choose where.

    PYTHONPATH=src HF_HUB_OFFLINE=1 flock /tmp/effdiff-heavy.lock python benchmarks/cache_l2c.py [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from cache_peers import PROMPTS, section

import effdiff

FASTER = [
    ("faster (paper non-uniform keys)", "effdiff:faster"),
    ("faster uniform interval 2", "effdiff:faster:schedule=uniform,interval=2"),
    ("faster + prior noise 0.003", "effdiff:faster:noise=0.003"),
]
L2C = [
    ("l2c period 2, fraction 0.3", "effdiff:l2c:fraction=0.3"),
    ("l2c period 2, fraction 0.4", "effdiff:l2c:fraction=0.4"),
    ("fora interval 2 (fraction 0.5)", "effdiff:fora:interval=2"),
    ("l2c period 3, fraction 0.5", "effdiff:l2c:period=3,fraction=0.5"),
    ("fora interval 3 (fraction 0.667)", "effdiff:fora:interval=3"),
    ("l2c period 4, fraction 0.667", "effdiff:l2c:period=4,fraction=0.6667"),
]


def train_routers(model: str, variants: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Train (or load) every router the variants need, before any timing; returns what each took."""
    pipe = effdiff.load(model)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for label, spec in variants:
        recipe = spec.removeprefix("effdiff:")
        if not recipe.startswith("l2c"):
            continue
        start = time.perf_counter()
        effdiff.accelerate(pipe, recipe)
        method = pipe.effdiff.methods[0]
        pipe.effdiff.remove()
        row = {"model": model, "variant": label, "router": str(method.source),
               "train_seconds": method.record["train_seconds"], "iterations": method.record["iterations"],
               "loss_first": method.record["loss_first"], "loss_last": method.record["loss_last"],
               "apply_seconds": round(time.perf_counter() - start, 2), "threshold": method.threshold}
        print(f"  router for {label}: trained in {row['train_seconds']:.1f} s ({row['iterations']} iterations, "
              f"loss {row['loss_first']:.4f} -> {row['loss_last']:.4f}); this apply took {row['apply_seconds']} s",
              flush=True)
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--only", choices=("sd", "dit"), default=None)
    parser.add_argument("--out", default="benchmarks/results/cache-l2c/cache_l2c.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.time()
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {"rows": [], "routers": []}
    result.update(benchmark="cache_l2c", when=time.strftime("%Y-%m-%d %H:%M:%S"), torch=torch.__version__,
                  machine=f"{platform.machine()} threads={torch.get_num_threads()}", prompts=PROMPTS, guidance=4.0,
                  reps=args.reps, steps=args.steps)
    sections = []
    if args.only in (None, "sd"):
        sections.append(("(a) Faster Diffusion (U-Net encoder propagation)", "tiny-sd", FASTER))
    if args.only in (None, "dit"):
        sections.append(("(b) Learning-to-Cache vs FORA at the same cached fraction", "tiny-dit", L2C))
    for title, model, variants in sections:
        routers = train_routers(model, variants)
        rows = section(title, model, args.steps, variants, args.reps)
        trained = {r["variant"]: r for r in routers}
        for row in rows:
            if row["variant"] in trained:
                row["labels"] = ["trained"]
                row["train_seconds"] = trained[row["variant"]]["train_seconds"]
        keep = {(r["model"], r["variant"]) for r in rows}
        result["rows"] = [r for r in result["rows"] if (r["model"], r["variant"]) not in keep] + rows
        result["routers"] = [r for r in result.get("routers", []) if r["model"] != model] + routers
        result["seconds"] = round(time.time() - started, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))  # saved per section: a timed-out run keeps what finished
    print(f"\n{'model':9s} {'variant':34s} {'speedup':>8s} {'flops÷':>7s} {'eff':>5s} {'psnr':>7s} {'ssim':>6s} "
          f"{'nfe':>4s} {'cached':>6s}")
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['model']:9s} {r['variant']:34s} ERROR {r['error'][:70]}")
            continue
        print(f"{r['model']:9s} {r['variant']:34s} {r['speedup']:8.2f} {r.get('flop_ratio', float('nan')):7.2f} "
              f"{r.get('efficiency', float('nan')):5.2f} {r['psnr']:7.2f} {r['ssim']:6.3f} {r['nfe']:4d} "
              f"{r.get('cached_calls', 0):6d}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
