"""Quality and cost of the compressed (pruned + finetuned) models at the zoo's quality bar, beside their teacher.

Per model and per compressed folder shipped beside it (``zoo/weights/<model>/compress/``): FID/KID against the
1,000 held-out digits and prompt accuracy (the quality bar's prompts and seeds, ``effdiff zoo eval``) at DDIM 20 +
CFG 4; parameters and MACs of one denoiser call against the original's; and the denoiser's wall time per call
(batch 2, the CFG batch, and any other ``--batches``) against the original's, alternating in one process (median
of 7). At 32 px a call of batch 2 is dominated by per-layer overhead that pruning does not remove; larger batches
(a batched evaluation, or a server packing requests) show how much of the MAC reduction the compute itself
returns. ``--speed-only`` skips the scoring. With ``--teacher``
the teacher's own DDIM 20 + CFG 4 row is scored in the same run (the same prompts and seeds gave FID 1.53 on
tiny-sd and 2.96 on tiny-dit in ``benchmarks/results/distill_quality*.json``). End-to-end speed-ups come from
``effdiff bench``.

    HF_HUB_OFFLINE=1 python benchmarks/compress_quality.py [--models tiny-sd tiny-dit] [--per-digit 100]
        [--teacher] [--steps 20] [--only FOLDER ...] [--folders PATH ...] [--batches 2 16 64] [--speed-only]

``--folders`` scores compressed models written elsewhere (``effdiff compress … --out PATH``) instead of the shipped
ones, each with the model its record names.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import effdiff
from effdiff.adapters import adapter_for
from effdiff.compress.prune import call_macs
from effdiff.compress.trainer import RECORD, recipe_of
from effdiff.eval.cost import time_alternating
from effdiff.host import cpu_description
from effdiff.zoo.evaluate import generate_eval_samples, score_samples
from effdiff.zoo.load import WEIGHTS


def per_call_seconds(pipe, recipe: str, batch: int = 2) -> tuple[float, float]:
    """Median seconds of one denoiser call of ``batch`` samples, of the original and with ``recipe``,
    alternating."""
    call = adapter_for(pipe.denoiser).example_call(batch)
    with torch.no_grad():
        original, compressed = time_alternating(
            lambda: pipe.denoiser(**call), lambda: pipe.denoiser(**call), reps=7, warmup=2,
            enter_variant=lambda: effdiff.accelerate(pipe, recipe), exit_variant=lambda: pipe.effdiff.remove())
    return original.median, compressed.median


def score(pipe, recipe: str, per_digit: int, steps: int) -> dict:
    if recipe:
        effdiff.accelerate(pipe, recipe)
    started = time.perf_counter()
    try:
        images, digits = generate_eval_samples(pipe, per_digit=per_digit, steps=steps, guidance=4.0)
    finally:
        if recipe:
            pipe.effdiff.remove()
    scores = score_samples((images + 1) / 2, digits)
    return {"generate_seconds": round(time.perf_counter() - started, 1),
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-sd", "tiny-dit"])
    parser.add_argument("--per-digit", type=int, default=100)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--teacher", action="store_true", help="also score the teacher in this run")
    parser.add_argument("--only", nargs="+", default=[], help="these compressed folders (exact names) only")
    parser.add_argument("--folders", nargs="+", type=Path, default=[],
                        help="compressed folders made elsewhere (effdiff compress --out), instead of the shipped ones")
    parser.add_argument("--batches", nargs="+", type=int, default=[2],
                        help="time one denoiser call at each of these batch sizes (the first is the row's speed-up)")
    parser.add_argument("--speed-only", action="store_true", help="time the calls, skip FID/KID and accuracy")
    parser.add_argument("--out", default="benchmarks/results/compress_quality.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started, rows = time.time(), []
    for model in args.models:
        pipe = effdiff.load(model)
        full_macs = call_macs(pipe.denoiser)
        full_params = sum(p.numel() for p in pipe.denoiser.parameters())
        print(f"== {model}: {10 * args.per_digit} samples, DDIM {args.steps} + CFG 4", flush=True)
        if args.teacher and not args.speed_only:
            rows.append({"model": model, "variant": "teacher", "recipe": "", **score(pipe, "", args.per_digit,
                                                                                     args.steps)})
            print(f"  teacher  FID {rows[-1]['fid']:.3f}  accuracy {rows[-1]['prompt_accuracy']:.1%}", flush=True)
        for folder in args.folders or sorted((WEIGHTS / model / "compress").glob("*/")):
            record = json.loads((folder / RECORD).read_text())
            if (args.only and folder.name not in args.only) or record["teacher"] != model:
                continue
            recipe = recipe_of(record, folder)
            effdiff.accelerate(pipe, recipe)
            macs, params = call_macs(pipe.denoiser), sum(p.numel() for p in pipe.denoiser.parameters())
            pipe.effdiff.remove()
            timings = {batch: per_call_seconds(pipe, recipe, batch) for batch in args.batches}
            original_s, compressed_s = timings[args.batches[0]]
            row = {"model": model, "variant": folder.name, "recipe": recipe, "macs_fraction": macs / full_macs,
                   "params_fraction": params / full_params, "call_seconds_original": original_s,
                   "call_seconds_compressed": compressed_s, "call_speedup": original_s / compressed_s,
                   "call_speedup_by_batch": {batch: a / b for batch, (a, b) in timings.items()},
                   **({} if args.speed_only else score(pipe, recipe, args.per_digit, args.steps)),
                   "training": {k: record.get(k) for k in ("iterations_done", "wall_seconds", "machine", "ratio",
                                                           "removed", "blocks", "kept")}}
            rows.append(row)
            speeds = "  ".join(f"batch {b}: {s:.2f}x" for b, s in row["call_speedup_by_batch"].items())
            quality = "" if args.speed_only else (f"  FID {row['fid']:.3f}  KID {row['kid']:.4f}  "
                                                  f"accuracy {row['prompt_accuracy']:.1%}")
            print(f"  {folder.name:32s} MACs {row['macs_fraction']:.1%}  params {row['params_fraction']:.1%}  "
                  f"call {speeds}{quality}", flush=True)
    result = {"benchmark": "compress_quality", "when": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": f"{cpu_description()} threads={torch.get_num_threads()}",
              "torch": torch.__version__, "per_digit": None if args.speed_only else args.per_digit,
              "steps": args.steps, "batches": args.batches,
              "seconds": round(time.time() - started, 1), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
