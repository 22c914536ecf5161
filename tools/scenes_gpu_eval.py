"""Score trained scene-sd / scene-dit exports GenEval-style on a machine without MiniLM (the GPU run).

Every model generates the fixed evaluation prompts (zoo/scenes.py) under each sampler setting and
seed; the trained scene judge scores them. Caption states come from the scene bundle, so neither
MiniLM nor mlxtend is needed. The JSON is rewritten after each model, so a later failure keeps the
earlier results.

Usage: python tools/scenes_gpu_eval.py OUT.json --judge JUDGE_EXPORT --model scene-sd=EXPORT ...
       [--device cuda] [--seeds 3] [--per-category 48] [--step-divisor 1]
       [--samples OUT.pt] [--preview DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from effdiff.zoo.checkpoints import load_classifier, read_record
from effdiff.zoo.load import _from_folder
from effdiff.zoo.scene_data import prompt_states, scene_bundle
from effdiff.zoo.scene_judge import SceneJudge, correct, heldout_accuracy
from effdiff.zoo.scenes import CATEGORIES, eval_prompts, score_by_category

GUIDANCE = 4.0
# (label, solver, steps): the targets compare DDIM-5/10 and the 10-step solvers with DDIM-50
SETTINGS = (("ddim-50", "ddim", 50), ("ddim-5", "ddim", 5), ("ddim-10", "ddim", 10),
            ("dpm++-10", "dpm++", 10), ("unipc-10", "unipc", 10))


def scheduler_for(solver: str, base):
    """DDIM as trained, or DPM-Solver++ 2M / UniPC on the same schedule (the solvers' registry configs)."""
    if solver == "ddim":
        return base
    if solver == "dpm++":
        return DPMSolverMultistepScheduler.from_config(base.config, solver_order=2, algorithm_type="dpmsolver++")
    return UniPCMultistepScheduler.from_config(base.config)


def evaluation_set(per_category: int):
    """The first ``per_category`` prompts of each category of the fixed set (all of them are in the bundle)."""
    prompts = eval_prompts()
    return [p for c in CATEGORIES for p in [q for q in prompts if q.category == c][:per_category]]


@torch.no_grad()
def generate(pipe, texts: list[str], steps: int, seed: int, device: str) -> torch.Tensor:
    """Images in [-1, 1]; image i uses seed ``seed * 100_000 + i`` (so settings share initial noise)."""
    generators = [torch.Generator(device).manual_seed(seed * 100_000 + i) for i in range(len(texts))]
    out = pipe(texts, num_inference_steps=steps, guidance_scale=GUIDANCE, generator=generators, output_type="pt")
    return out.images * 2 - 1


def summarise(per_seed: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = per_seed[0].keys()
    return {"mean": {k: round(statistics.mean(s[k] for s in per_seed), 4) for k in keys},
            "std": {k: round(statistics.stdev(s[k] for s in per_seed), 4) if len(per_seed) > 1 else 0.0
                    for k in keys}}


def save_preview(images: dict[str, torch.Tensor], path: Path, per_row: int = 24) -> None:
    """A PNG: one row of the first ``per_row`` samples per setting (best effort: PIL may be missing)."""
    try:
        from PIL import Image
    except ImportError:
        return
    rows = [((im[:per_row] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu() for im in images.values()]
    grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)  # (3, rows*64, per_row*64)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


def evaluate_model(kind: str, folder: Path, judge, states, prompts, args) -> tuple[dict, torch.Tensor]:
    pipe = _from_folder(folder, kind, None, None).to(args.device)
    pipe._caption_cache.update(states)
    base = pipe.scheduler
    texts = [p.text for p in prompts]
    result = {"record": read_record(folder), "settings": {}}
    first_seed: dict[str, torch.Tensor] = {}
    for label, solver, steps in SETTINGS:
        steps = max(1, steps // args.step_divisor)
        pipe.scheduler = scheduler_for(solver, base)
        per_seed, seconds = [], 0.0
        for seed in range(args.seeds):
            start = time.perf_counter()
            images = generate(pipe, texts, steps, seed, args.device)
            seconds += time.perf_counter() - start
            per_seed.append(score_by_category(prompts, correct(judge, images, prompts)))
            if seed == 0:
                first_seed[label] = images
        result["settings"][label] = {"solver": solver, "steps": steps, "guidance": GUIDANCE,
                                     "per_seed": per_seed, **summarise(per_seed),
                                     "seconds_per_seed": round(seconds / args.seeds, 2)}
        print(kind, label, result["settings"][label]["mean"]["overall"], "±",
              result["settings"][label]["std"]["overall"], flush=True)
    pipe.scheduler = base
    if args.preview:
        save_preview(first_seed, Path(args.preview) / f"{kind}.png")
    return result, first_seed["ddim-50"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--judge", type=Path, required=True)
    parser.add_argument("--model", action="append", default=[], help="KIND=EXPORT_FOLDER (repeatable)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--per-category", type=int, default=48)
    parser.add_argument("--step-divisor", type=int, default=1, help="divide every step count (dry runs only)")
    parser.add_argument("--samples", type=Path, help="save the DDIM-50 seed-0 samples (uint8) for FID/KID later")
    parser.add_argument("--preview", type=Path, help="folder for one preview PNG per model")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    bundle = scene_bundle()
    states = prompt_states(bundle)
    prompts = evaluation_set(args.per_category)
    missing = [p.text for p in prompts if p.text not in states]
    if missing:  # a bundle built by older code: its caption states cannot serve these prompts
        raise SystemExit(f"{len(missing)} evaluation prompts are not in the bundle (stale?), e.g. {missing[:3]}")
    judge = load_classifier(args.judge, SceneJudge).to(args.device)
    report = {"guidance": GUIDANCE, "seeds": args.seeds, "prompts": len(prompts),
              "per_category": args.per_category, "step_divisor": args.step_divisor,
              "judge": {"record": read_record(args.judge),
                        "heldout_accuracy": heldout_accuracy(judge, bundle, device=args.device)},
              "models": {}}
    samples = {"texts": [p.text for p in prompts]}
    for spec in args.model:
        kind, folder = spec.split("=", 1)
        try:
            report["models"][kind], images = evaluate_model(kind, Path(folder), judge, states, prompts, args)
            samples[kind] = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()
        except Exception:  # one model's failure must not lose the other's numbers
            report["models"][kind] = {"error": traceback.format_exc()}
            print(report["models"][kind]["error"], flush=True)
        args.out.write_text(json.dumps(report, indent=1))
        if args.samples:
            torch.save(samples, args.samples)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report["judge"]["heldout_accuracy"]))


if __name__ == "__main__":
    main()
