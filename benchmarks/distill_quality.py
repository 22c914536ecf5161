"""Quality of the distilled students at the zoo's quality bar: FID/KID against the 1,000 held-out digits, prompt
accuracy, with the quality bar's prompts and seeds (``effdiff zoo eval``), beside what the same teacher does in as
many steps without distillation — every row of a model in one run.

Rows per model: ``lcm`` and ``progressive`` at 4, 2 and 1 steps (guidance folded in, no CFG pass); ``rectflow``'s
one-step student, and its reflowed student at 4, 2 and 1 steps (what reflow alone buys); ``dmd``'s one-step
generator; the teacher with DDIM at 4 steps and CFG 4, and with diffusers' ``LCMScheduler`` at 4 steps and CFG 4
but no distillation (what swapping the scheduler alone gives); ``guidance-distill`` (LoRA and full student) at
DDIM 20 (w 4, one pass a step) beside the teacher's DDIM 20 + CFG 4; with ``--baseline`` also the teacher's
DDIM 50 + CFG 4 (the reference; 100 denoiser calls an image) and ``guidance-distill`` (LoRA and full student)
at DDIM 50. A row whose student is not shipped is left out and said so. Denoiser calls per image are counted,
not assumed. Speed-ups come from ``effdiff bench``, which times each recipe against the baseline in one process.

    HF_HUB_OFFLINE=1 python benchmarks/distill_quality.py [--per-digit 100] [--baseline] [--models tiny-sd tiny-dit]
        [--only lcm progressive] [--student FOLDER] [--w 4]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

import effdiff
from effdiff.distill.store import RECORD
from effdiff.host import cpu_description
from effdiff.zoo.evaluate import generate_eval_samples, score_samples
from effdiff.zoo.load import WEIGHTS


class Variant(NamedTuple):
    label: str
    recipe: str
    steps: int
    guidance: float  # what the call passes (guidance-distill takes it as its w)
    swap: bool = False  # swap the scheduler for LCMScheduler without distillation
    student: str = ""  # the student folder (under <model>/distill) the row needs


VARIANTS = [
    Variant("lcm 4 steps", "lcm:steps=4", 4, 1.0, student="lcm-lora"),
    Variant("lcm 2 steps", "lcm:steps=2", 2, 1.0, student="lcm-lora"),
    Variant("lcm 1 step", "lcm:steps=1", 1, 1.0, student="lcm-lora"),
    Variant("progressive 4 steps", "progressive:steps=4", 4, 1.0, student="progressive-lora/steps-4"),
    Variant("progressive 2 steps", "progressive:steps=2", 2, 1.0, student="progressive-lora/steps-2"),
    Variant("progressive 1 step", "progressive:steps=1", 1, 1.0, student="progressive-lora/steps-1"),
    Variant("rectflow one-step student, 1 step", "rectflow", 1, 1.0, student="rectflow-lora/onestep"),
    Variant("rectflow reflowed, 4 steps", "rectflow:steps=4", 4, 1.0, student="rectflow-lora/reflow"),
    Variant("rectflow reflowed, 2 steps", "rectflow:steps=2", 2, 1.0, student="rectflow-lora/reflow"),
    Variant("rectflow reflowed, 1 step (not distilled)", "rectflow:stage=reflow,steps=1", 1, 1.0,
            student="rectflow-lora/reflow"),
    Variant("dmd one-step generator, 1 step", "dmd", 1, 1.0, student="dmd-lora"),
    Variant("teacher DDIM 4 + CFG 4", "", 4, 4.0),
    Variant("teacher LCMScheduler 4 + CFG 4, not distilled", "", 4, 4.0, swap=True),
    Variant("guidance-distill DDIM 20, w 4", "guidance-distill", 20, 4.0, student="guidance-distill-lora"),
    Variant("guidance-distill full student DDIM 20, w 4", "guidance-distill:form=full", 20, 4.0,
            student="guidance-distill"),
    Variant("teacher DDIM 20 + CFG 4", "", 20, 4.0),
]
WITH_BASELINE = [
    Variant("teacher DDIM 50 + CFG 4 (baseline)", "", 50, 4.0),
    Variant("guidance-distill DDIM 50, w 4", "guidance-distill", 50, 4.0, student="guidance-distill-lora"),
    Variant("guidance-distill full student DDIM 50, w 4", "guidance-distill:form=full", 50, 4.0,
            student="guidance-distill"),
]


def count_calls(pipe: Any) -> list[int]:
    """Batch sizes of every denoiser call from now on (a CFG call counts both halves)."""
    batches: list[int] = []
    pipe.denoiser.register_forward_pre_hook(lambda _m, args, kwargs: batches.append(len(args[0])), with_kwargs=True)
    return batches


def score(pipe: Any, variant: Variant, per_digit: int, batches: list[int]) -> dict:
    from diffusers import LCMScheduler

    original = pipe.scheduler
    if variant.recipe:
        effdiff.accelerate(pipe, variant.recipe)
    if variant.swap:
        pipe.scheduler = LCMScheduler.from_config(original.config)
    batches.clear()
    started = time.perf_counter()
    try:
        images, digits = generate_eval_samples(pipe, per_digit=per_digit, steps=variant.steps,
                                               guidance=variant.guidance)
    finally:
        if variant.swap:
            pipe.scheduler = original
        if variant.recipe:
            pipe.effdiff.remove()
    seconds = time.perf_counter() - started
    calls = sum(batches) / len(images)
    scores = score_samples((images + 1) / 2, digits)
    row = {"variant": variant.label, "recipe": variant.recipe, "steps": variant.steps, "guidance": variant.guidance,
           "calls_per_image": calls, "generate_seconds": round(seconds, 1),
           **{k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()}}
    print(f"  {variant.label:48s} FID {row['fid']:.3f}  KID {row['kid']:.4f}  accuracy {row['prompt_accuracy']:.1%}"
          f"  ({calls:g} calls/image, {seconds:.0f} s)", flush=True)
    return row


def training_of(folder: Path) -> dict | None:
    """How the row's student was made (from its record), or None when there is none."""
    path = folder / RECORD
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return {k: record[k] for k in ("iterations_done", "wall_seconds", "machine", "file_fraction_of_model")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-sd", "tiny-dit"])
    parser.add_argument("--per-digit", type=int, default=100)
    parser.add_argument("--baseline", action="store_true", help="also score DDIM 50 + CFG 4 (slow)")
    parser.add_argument("--only", nargs="+", default=[], help="rows whose label contains one of these words")
    parser.add_argument("--student", type=Path,
                        help="score the student rows --only picks with this folder instead of the shipped one (an "
                             "experiment's, e.g. written by effdiff distill --out)")
    parser.add_argument("--w", type=float, default=4.0,
                        help="the guidance scale the guidance-distill rows ask their student for (the teacher rows "
                             "keep CFG 4): does asking for more make up for a student that under-applies it?")
    parser.add_argument("--out", default="benchmarks/results/distill_quality.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.time()
    rows: list[dict] = []
    for model in args.models:
        print(f"== {model}: {10 * args.per_digit} samples", flush=True)
        pipe = effdiff.load(model)
        batches = count_calls(pipe)
        for variant in (WITH_BASELINE if args.baseline else []) + VARIANTS:
            if args.only and not any(word in variant.label for word in args.only):
                continue
            folder = args.student or WEIGHTS / model / "distill" / variant.student
            training = training_of(folder) if variant.student else None
            if variant.student and training is None:
                print(f"  {variant.label}: no student in {folder}; row left out", flush=True)
                continue
            if variant.recipe.startswith("guidance-distill") and args.w != variant.guidance:
                variant = variant._replace(label=variant.label.replace(f"w {variant.guidance:g}", f"w {args.w:g}"),
                                           guidance=args.w)
            if variant.student and args.student:
                joiner = "," if ":" in variant.recipe else ":"
                variant = variant._replace(label=f"{variant.label} ({args.student.name})",
                                           recipe=f"{variant.recipe}{joiner}path={args.student}")
            rows.append({"model": model, **score(pipe, variant, args.per_digit, batches),
                         "student_training": training})
            save(args, rows, started)  # after every row: a run stopped early keeps what it scored


def save(args: argparse.Namespace, rows: list[dict], started: float) -> None:
    result = {"benchmark": "distill_quality", "when": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": f"{cpu_description()} threads={torch.get_num_threads()}",
              "torch": torch.__version__, "per_digit": args.per_digit, "seconds": round(time.time() - started, 1),
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
