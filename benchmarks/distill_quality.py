"""Quality of the distilled students at the zoo's quality bar: FID/KID against the 1,000 held-out digits, prompt
accuracy, with the quality bar's prompts and seeds (``effdiff zoo eval``), beside what the same teacher does in as
few steps without distillation.

Rows per model: ``lcm`` at 4, 2 and 1 steps (guidance folded in, no CFG pass); the teacher with DDIM at 4 steps and
CFG 4; the teacher with diffusers' ``LCMScheduler`` at 4 steps and CFG 4 but no distillation (what swapping the
scheduler alone gives); with ``--baseline`` also the teacher's DDIM 50 + CFG 4 (the reference; 100 denoiser calls
an image, about 40 min per model at 1,000 samples on 2 cores). Speed-ups come from ``effdiff bench``, which times
each recipe against the baseline in one process.

    HF_HUB_OFFLINE=1 python benchmarks/distill_quality.py [--per-digit 100] [--baseline] [--models tiny-sd tiny-dit]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

import effdiff
from effdiff.distill.store import RECORD
from effdiff.zoo.evaluate import generate_eval_samples, score_samples
from effdiff.zoo.load import WEIGHTS

VARIANTS = [  # (label, recipe, steps, guidance, swap the scheduler for LCMScheduler without distillation)
    ("lcm 4 steps", "lcm:steps=4", 4, 1.0, False),
    ("lcm 2 steps", "lcm:steps=2", 2, 1.0, False),
    ("lcm 1 step", "lcm:steps=1", 1, 1.0, False),
    ("teacher DDIM 4 + CFG 4", "", 4, 4.0, False),
    ("teacher LCMScheduler 4 + CFG 4, not distilled", "", 4, 4.0, True),
]
BASELINE = ("teacher DDIM 50 + CFG 4 (baseline)", "", 50, 4.0, False)


def score(pipe: Any, label: str, recipe: str, steps: int, guidance: float, swap: bool, per_digit: int) -> dict:
    from diffusers import LCMScheduler

    original = pipe.scheduler
    if recipe:
        effdiff.accelerate(pipe, recipe)
    if swap:
        pipe.scheduler = LCMScheduler.from_config(original.config)
    started = time.perf_counter()
    try:
        images, digits = generate_eval_samples(pipe, per_digit=per_digit, steps=steps, guidance=guidance)
    finally:
        if swap:
            pipe.scheduler = original
        if recipe:
            pipe.effdiff.remove()
    seconds = time.perf_counter() - started
    calls = steps * (2 if guidance > 1 else 1)
    scores = score_samples((images + 1) / 2, digits)
    row = {"variant": label, "recipe": recipe, "steps": steps, "guidance": guidance, "calls_per_image": calls,
           "generate_seconds": round(seconds, 1), **{k: round(v, 4) if isinstance(v, float) else v
                                                     for k, v in scores.items()}}
    print(f"  {label:48s} FID {row['fid']:.3f}  KID {row['kid']:.4f}  accuracy {row['prompt_accuracy']:.1%}"
          f"  ({calls} calls/image, {seconds:.0f} s)", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-sd", "tiny-dit"])
    parser.add_argument("--per-digit", type=int, default=100)
    parser.add_argument("--baseline", action="store_true", help="also score DDIM 50 + CFG 4 (slow)")
    parser.add_argument("--out", default="benchmarks/results/distill_quality.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.time()
    rows = []
    for model in args.models:
        print(f"== {model}: {10 * args.per_digit} samples", flush=True)
        pipe = effdiff.load(model)
        record_path = WEIGHTS / model / "distill" / "lcm-lora" / RECORD
        record = json.loads(record_path.read_text()) if record_path.is_file() else None
        if record is None:
            print(f"  no LCM-LoRA shipped for {model}: only the teacher rows", flush=True)
        for variant in ([BASELINE] if args.baseline else []) + VARIANTS:
            if variant[1].startswith("lcm") and record is None:
                continue
            training = {k: record[k] for k in ("iterations_done", "wall_seconds", "machine",
                                               "file_fraction_of_model")} if record else None
            rows.append({"model": model, **score(pipe, *variant, args.per_digit), "student_training": training})
    result = {"benchmark": "distill_quality", "when": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": f"{platform.machine()} {platform.processor()} threads={torch.get_num_threads()}",
              "torch": torch.__version__, "per_digit": args.per_digit, "seconds": round(time.time() - started, 1),
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
