"""ToMe side by side with ``tomesd``: same pipeline, prompts, seeds and settings, one process.

``tomesd.apply_patch(pipe, ratio=r, max_downsample=d, use_rand=u)`` vs effdiff
``tome:ratio=r,max_downsample=d,use_rand=u`` on
- ``tiny-sd`` (trained, 32 px pixel space, attention at downsample 2 and 4, so ``max_downsample=2``),
  50 DDIM steps, guidance 4, 2 prompts; plus the stack ``dpmpp2m:steps=20+deepcache:interval=3+tome``;
- ``sd15-arch`` (speed-only twin) at 256 px (``--px 512`` for 512 px), ``--twin-steps`` DDIM steps,
  guidance 4, 1 prompt; ``max_downsample=1`` (tomesd's default).
Timing: every variant warmed once, then ``--reps`` rounds of baseline and all variants in turn; speed-up =
baseline median / variant median. PSNR: each variant's images vs the baseline's (same noise) and effdiff's
vs tomesd's at equal settings (on the speed-only twin PSNR only measures agreement between the two
implementations, not quality).

    PYTHONPATH=src HF_HUB_OFFLINE=1 python benchmarks/tokens_peers.py [--only tiny-sd|sd15-arch] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from cache_peers import effdiff_variant
from tokens_breakeven import OUT, Switch, merge_rows, round_robin, tomesd_switch

import effdiff
from effdiff.eval.fidelity import psnr

PROMPTS = ["a handwritten seven", "a handwritten three"]


def generate(pipe: Any, prompts: list[str], steps: int, **kwargs: Any) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        out = pipe(prompts, num_inference_steps=steps, guidance_scale=4.0, generator=generator, output_type="pt",
                   **kwargs).images
        return torch.as_tensor(out).float()

    return run


def pair(pipe: Any, ratio: float, max_downsample: int, use_rand: bool) -> Switch:
    """tomesd and effdiff at the same settings."""
    flag = str(use_rand).lower()
    recipe = f"tome:ratio={ratio},max_downsample={max_downsample},use_rand={flag}"
    return {
        f"tomesd ratio={ratio},max_downsample={max_downsample},use_rand={flag}": tomesd_switch(
            pipe, ratio=ratio, max_downsample=max_downsample, use_rand=use_rand),
        f"effdiff {recipe}": effdiff_variant(pipe, recipe),
    }


def rows_of(model: str, px: int, steps: int, times: dict[str, list[float]], outputs: dict[str, torch.Tensor],
            peaks: dict[str, int]) -> list[dict[str, Any]]:
    base = statistics.median(times["baseline"])
    rows = []
    for name, secs in times.items():
        med = statistics.median(secs)
        row = {"model": model, "px": px, "steps": steps, "variant": name, "median_s": round(med, 3),
               "times_s": [round(t, 3) for t in secs], "speedup": round(base / med, 3),
               "peak_mb": round(peaks[name] / 2**20), "psnr_vs_baseline": round(psnr(outputs[name],
                                                                                      outputs["baseline"]), 2)}
        if name.startswith("effdiff tome:"):
            twin = "tomesd " + name.removeprefix("effdiff tome:")
            if twin in outputs:
                row["psnr_vs_tomesd"] = round(psnr(outputs[name], outputs[twin]), 2)
                row["speedup_vs_tomesd"] = round(statistics.median(times[twin]) / med, 3)
        rows.append(row)
        extra = "".join(f"  {k} {row[k]}" for k in ("psnr_vs_tomesd", "speedup_vs_tomesd") if k in row)
        print(f"  {model:9s} {px}px {name:58s} {row['speedup']:5.2f}x  {med:8.3f}s  psnr {row['psnr_vs_baseline']:6.2f}"
              f"  peak {row['peak_mb']} MB{extra}", flush=True)
    return rows


def tiny_sd(args: argparse.Namespace) -> list[dict[str, Any]]:
    pipe = effdiff.load("tiny-sd")
    switch: Switch = {"baseline": (lambda: None, lambda: None)}
    for use_rand in (True, False):
        switch.update(pair(pipe, args.ratio, 2, use_rand))
    stack = f"dpmpp2m:steps=20+deepcache:interval=3+tome:ratio={args.ratio},max_downsample=2"
    switch[f"effdiff {stack}"] = effdiff_variant(pipe, stack)
    without_tome = "dpmpp2m:steps=20+deepcache:interval=3"
    switch[f"effdiff {without_tome}"] = effdiff_variant(pipe, without_tome)
    times, outputs, peaks, _ = round_robin(switch, generate(pipe, PROMPTS, 50), args.reps, "tiny-sd")
    return rows_of("tiny-sd", 32, 50, times, outputs, peaks)


def sd15(args: argparse.Namespace, px: int) -> list[dict[str, Any]]:
    pipe = effdiff.load("sd15-arch")
    switch: Switch = {"baseline": (lambda: None, lambda: None), **pair(pipe, args.ratio, 1, True)}
    run = generate(pipe, PROMPTS[:1], args.twin_steps, height=px, width=px)
    times, outputs, peaks, _ = round_robin(switch, run, args.reps, f"sd15-arch {px}px")
    return rows_of("sd15-arch", px, args.twin_steps, times, outputs, peaks)


def save(rows: list[dict[str, Any]], args: argparse.Namespace, started: float) -> Path:
    header = {"benchmark": "tokens_peers", "labels": {"tiny-sd": "trained", "sd15-arch": "speed-only"},
              "guidance": 4.0, "reps": args.reps}
    return merge_rows(OUT / "peers.json", header, rows, started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("tiny-sd", "sd15-arch"))
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--twin-steps", type=int, default=10)
    parser.add_argument("--px", type=int, action="append", help="sd15-arch image sizes (default 256)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.time()
    if args.only in (None, "tiny-sd"):
        print(f"saved {save(tiny_sd(args), args, started)}", flush=True)
    if args.only in (None, "sd15-arch"):
        for px in args.px or [256]:
            print(f"saved {save(sd15(args, px), args, started)}", flush=True)


if __name__ == "__main__":
    main()
