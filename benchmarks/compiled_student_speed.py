"""End-to-end speed of a compiled few-step student against the eager DDIM 50 + CFG 4 baseline, timed alternating.

The bench times a ``compile`` recipe in adjacent blocks (re-applying it would recompile), so a host whose speed
drifts during the run moves its ratio; here the baseline and the compiled student are two pipelines of one model
in one process, called in turn (B V B V ...), one image a call, so drift hits both alike.

    HF_HUB_OFFLINE=1 python benchmarks/compiled_student_speed.py [--recipes lcm:steps=4+compile lcm:steps=4]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

import effdiff
from effdiff.eval.cost import time_alternating
from effdiff.host import cpu_description


def one_image(pipe, **settings) -> Callable[[], object]:
    """One seeded image from ``pipe`` (the student's recipe decides its own steps and guidance)."""
    return lambda: pipe("a handwritten seven", generator=torch.Generator().manual_seed(0), output_type="pt",
                        **settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-sd", "tiny-dit"])
    parser.add_argument("--recipes", nargs="+", default=["lcm:steps=4", "lcm:steps=4+compile"])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results/compiled_student_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for model in args.models:
        baseline = effdiff.load(model)
        for recipe in args.recipes:
            student = effdiff.load(model)
            effdiff.accelerate(student, recipe)
            base_t, student_t = time_alternating(
                one_image(baseline, num_inference_steps=50, guidance_scale=4.0), one_image(student),
                reps=args.reps, warmup=2)
            ratios = [b / s for b, s in zip(base_t.times, student_t.times, strict=True)]
            rows.append({"model": model, "recipe": recipe, "baseline_s": base_t.median, "student_s": student_t.median,
                         "speedup": base_t.median / student_t.median, "paired_ratios": ratios})
            print(f"{model} {recipe}: baseline {base_t.median:.3f} s, student {student_t.median:.4f} s, "
                  f"{rows[-1]['speedup']:.1f}x (paired {min(ratios):.1f}-{max(ratios):.1f}x)", flush=True)
    Path(args.out).write_text(json.dumps({
        "benchmark": "compiled_student_speed", "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{cpu_description()} threads={torch.get_num_threads()}",
        "torch": torch.__version__, "reps": args.reps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
