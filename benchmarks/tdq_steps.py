"""TDQ at a step count it was not calibrated at: calibrate at ``--cal-steps``, sample at ``--steps``.

Same prompts, seeds, solver (DPM-Solver++ 2M), guidance 4 and scoring as ``quant_lowbit.py`` (FID/KID vs the
held-out digits, prompt accuracy, PSNR/SSIM vs the full-precision images at ``--steps``). Rows: ``qdiffusion``
(static grids) and ``tdq`` calibrated at ``--cal-steps`` (every sampling timestep unseen by TDQ's generators),
and ``tdq`` calibrated at ``--steps`` (seen), so the gap between the two ``tdq`` rows is the cost of generalising.
Speed is simulated (fake-quant); calibration time is the ``trained`` label.

    PYTHONPATH=src HF_HUB_OFFLINE=1 flock /tmp/effdiff-heavy.lock \\
        python benchmarks/tdq_steps.py --model tiny-sd --setting w4a4 --steps 10 --cal-steps 20 --samples 200
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from quant_lowbit import OUT, SETTINGS, fp_images, generate, merge, score

import effdiff
from effdiff.bench.runner import Caller, make_config
from effdiff.eval.distribution import DistributionJudge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-sd")
    parser.add_argument("--setting", default="w4a4", choices=sorted(SETTINGS))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cal-steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--batch", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(2)
    wbits, abits = SETTINGS[args.setting]
    pipe = effdiff.load(args.model)
    solver = f"dpmpp2m:steps={args.steps}"
    caller = Caller(pipe, make_config([args.model], [], args.samples, args.steps, 4.0, None, False))
    judge = DistributionJudge.bundled()
    reference, _ = fp_images(args.model, pipe, caller, solver, args.samples, args.steps, args.batch)
    header = {"model": args.model, "samples": args.samples, "solver": solver, "nfe": args.steps, "guidance": 4.0,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "speed": "simulated (fake-quant in float32; no speed-up claimed)"}
    out = Path(OUT) / f"tdq-steps-{args.model}.json"
    fp_row = {"setting": "fp32", "method": "fp32", **score(reference, reference, caller, judge)}
    merge(out, header, [fp_row])
    print(f"{args.model}: {args.samples} samples, {solver}, guidance 4; fp32 FID {fp_row['fid']:.2f}", flush=True)
    for method, cal in (("qdiffusion", args.cal_steps), ("tdq", args.cal_steps), ("tdq", args.steps)):
        recipe = f"{solver}+{method}:wbits={wbits},abits={abits},steps={cal}"
        effdiff.accelerate(pipe, recipe)
        try:
            quant = pipe.effdiff.methods[1]
            images, seconds = generate(caller, args.samples, args.batch)
            row = {"setting": args.setting, "method": f"{method} (calibrated at {cal} steps)", "recipe": recipe,
                   "calibration_steps": cal, **score(images, reference, caller, judge),
                   "calibration_s": quant.info["seconds"], "gen_s": seconds, "labels": ["simulated", "trained"],
                   "notes": {k: v for k, v in quant.info.items() if k not in ("values", "seconds")}}
        finally:
            pipe.effdiff.remove()
        merge(out, header, [row])
        print(f"  {row['method']:32s} FID {row['fid']:6.2f} KID {row['kid']:8.4f} acc {row['accuracy']:6.1%} "
              f"PSNR {row['psnr']:6.2f} SSIM {row['ssim']:.3f} calib {row['calibration_s']:.1f}s", flush=True)


if __name__ == "__main__":
    main()
