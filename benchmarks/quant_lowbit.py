"""Simulated low-bit quantization side by side: naive min-max PTQ vs Q-Diffusion vs SVDQuant, per bit width.

For each model and each setting (W8A8, W4A8, W4A16, W4A4) every method runs on the same pipeline, prompts
("a handwritten <digit>", digits cycling 0-9) and seeds, with DPM-Solver++ 2M at ``--steps`` steps and
guidance 4, against the same solver in full precision:

- FID / KID of ``--samples`` images vs the 1,000 held-out digits (bundled classifier features), beside the
  real-vs-real floor with the same sizes and class mix (``DistributionJudge.matched_floor``, as the bench);
- prompt accuracy (bundled classifier), PSNR / SSIM vs the full-precision images of the same seeds;
- stored size of the denoiser: packed integer codes (two per byte at 4 bits) + grids + what stays float32,
  over its float32 size;
- calibration time (label ``trained``). Speed is labelled ``simulated``: fake-quant runs in float32 and
  is slower than the baseline; no speed-up is claimed.

The full-precision images are cached (``$EFFDIFF_CACHE_DIR`` or ``~/.cache/effdiff``) so a grid split into
several runs scores every setting against the same baseline. ``--methods`` takes method names, each
optionally with one parameter (``--methods qdiffusion,tfmq:fsc=mse``). Rows are merged into
``benchmarks/results/quant-lowbit/<model>.json`` as they finish.

    PYTHONPATH=src HF_HUB_OFFLINE=1 flock /tmp/effdiff-heavy.lock \\
        python benchmarks/quant_lowbit.py --model tiny-sd --settings w8a8,w4a8 [--samples 200] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

import effdiff
from effdiff.bench.runner import Caller, make_config
from effdiff.eval.accuracy import prompt_accuracy
from effdiff.eval.distribution import DistributionJudge
from effdiff.eval.fidelity import fidelity

SETTINGS = {"w8a8": (8, 8), "w4a8": (4, 8), "w4a16": (4, 16), "w4a4": (4, 4)}
METHODS = ("ptq", "qdiffusion", "svdquant")
OUT = Path(__file__).parent / "results" / "quant-lowbit"


def generate(caller: Caller, samples: int, batch: int) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    chunks = [caller(range(i, min(i + batch, samples))) for i in range(0, samples, batch)]
    return torch.cat(chunks), time.perf_counter() - start


def fp_images(model: str, pipe: Any, caller: Caller, solver: str, samples: int, steps: int,
              batch: int) -> tuple[torch.Tensor, float | None]:
    root = Path(os.environ.get("EFFDIFF_CACHE_DIR") or Path.home() / ".cache" / "effdiff")
    path = root / f"quant-lowbit-fp-{model}-{samples}-{steps}.pt"
    if path.exists():
        return torch.load(path), None
    effdiff.accelerate(pipe, solver)
    try:
        images, seconds = generate(caller, samples, batch)
    finally:
        pipe.effdiff.remove()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(images, path)
    return images, seconds


def score(images: torch.Tensor, reference: torch.Tensor, caller: Caller, judge: DistributionJudge) -> dict[str, Any]:
    dist = judge.score(images)
    return {**{k: round(v, 3) for k, v in fidelity(images, reference).items()}, "fid": round(dist["fid"], 3),
            "kid": round(dist["kid"], 5), "accuracy": round(prompt_accuracy(images, caller.digits,
                                                                            judge.features.classifier), 4)}


def notes(info: dict[str, Any]) -> dict[str, Any]:
    """The calibration facts worth a results row: small scalars and name lists, not per-timestep tables."""
    return {k: v for k, v in info.items() if k not in ("values", "seconds") and len(json.dumps(v, default=str)) < 2000}


def merge(path: Path, header: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    data = json.loads(path.read_text()) if path.exists() else {"rows": []}
    keep = [r for r in data["rows"] if (r["setting"], r["method"]) not in {(n["setting"], n["method"]) for n in rows}]
    data.update(header)
    data["rows"] = keep + rows
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-sd")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    torch.set_num_threads(2)
    from effdiff.zoo.data import load_digits

    pipe = effdiff.load(args.model)
    solver = f"dpmpp2m:steps={args.steps}"
    config = make_config([args.model], [], args.samples, args.steps, 4.0, None, False)
    caller = Caller(pipe, config)
    judge = DistributionJudge.bundled()
    split = load_digits()
    floor = judge.matched_floor(split.train_images, split.train_labels, caller.digits)
    reference, fp_seconds = fp_images(args.model, pipe, caller, solver, args.samples, args.steps, args.batch)
    header = {"model": args.model, "samples": args.samples, "solver": solver, "nfe": args.steps, "guidance": 4.0,
              "fid_floor": round(floor["fid"], 3), "kid_floor": round(floor["kid"], 5),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
              "speed": "simulated (fake-quant in float32; no speed-up claimed)"}
    fp_row = {"setting": "fp32", "method": "fp32", **score(reference, reference, caller, judge),
              "size_ratio": 1.0, "gen_s": fp_seconds}
    print(f"{args.model}: {args.samples} samples, {solver}, guidance 4; FID floor {floor['fid']:.2f}", flush=True)
    print(f"  fp32: FID {fp_row['fid']:.2f} KID {fp_row['kid']:.4f} acc {fp_row['accuracy']:.1%}", flush=True)
    out = Path(args.out) / f"{args.model}.json"
    merge(out, header, [fp_row])
    for setting in args.settings.split(","):
        wbits, abits = SETTINGS[setting]
        for method in args.methods.split(","):
            name, _, extra = method.partition(":")  # "tfmq:fsc=mse": one method parameter rides along
            recipe = f"{solver}+{name}:{extra + ',' if extra else ''}wbits={wbits},abits={abits}"
            effdiff.accelerate(pipe, recipe)
            try:
                quant = pipe.effdiff.methods[1]
                images, seconds = generate(caller, args.samples, args.batch)
                size = quant.size()
                row = {"setting": setting, "method": method, "recipe": recipe,
                       **score(images, reference, caller, judge),
                       "size_ratio": round(size["bytes"] / size["fp32_bytes"], 4), "bytes": size["bytes"],
                       "fp32_bytes": size["fp32_bytes"], "calibration_s": quant.info["seconds"], "gen_s": seconds,
                       "labels": ["simulated", "trained"], "describe": pipe.effdiff.describe(),
                       "notes": notes(quant.info)}
            finally:
                pipe.effdiff.remove()
            merge(out, header, [row])
            print(f"  {setting} {method:10s} FID {row['fid']:7.2f} KID {row['kid']:8.4f} acc {row['accuracy']:6.1%} "
                  f"PSNR {row['psnr']:6.2f} size {row['size_ratio']:.3f}x calib {row['calibration_s']:.1f}s "
                  f"gen {seconds:.0f}s", flush=True)


if __name__ == "__main__":
    main()
