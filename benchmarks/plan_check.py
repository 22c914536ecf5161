"""``effdiff plan`` against the speed-ups DistriFusion's authors report: SDXL, 50 DDIM steps, one 3840 × 3840 image,
1.8×, 3.4× and 6.1× on 2, 4 and 8 A100s (their README's speed-up figure; without the CFG batch split). The plan's
kernel constants are fitted to the single-device H200 timings in ``effdiff.plan.hardware.CALIBRATION`` and carried
to the A100; the target is each prediction within ±25 % of the paper. Also printed: SDXL at 1024 px, where patches
are small and the per-kernel floor does not shrink with more devices.

    HF_HUB_OFFLINE=1 python benchmarks/plan_check.py [--out benchmarks/results/plan_check.json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from effdiff.plan.estimate import estimates, fitted_constants, resolve, table

PAPER = {2: 1.8, 4: 3.4, 8: 6.1}  # mit-han-lab/distrifuser README, SDXL 3840 px, A100s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/plan_check.json")
    args = parser.parse_args()
    constants, errors = fitted_constants()
    device, link = resolve("a100", "nvlink")
    checks, tables = [], []
    for devices, reported in PAPER.items():
        rows = estimates("sdxl-arch", 3840, devices, device, link, constants)
        predicted = next(r.speedup for r in rows if r.method == "distrifusion")
        checks.append({"devices": devices, "paper": reported, "plan": round(predicted, 2),
                       "error": round(predicted / reported - 1, 3), "within_25_percent": abs(predicted / reported - 1)
                       <= 0.25})
        tables.append(f"### SDXL 3840 px on {devices} × A100 (NVLink)\n\n{table(rows)}")
    for devices in (2, 4, 8):
        tables.append(f"### SDXL 1024 px on {devices} × A100 (NVLink)\n\n"
                      f"{table(estimates('sdxl-arch', 1024, devices, device, link, constants))}")
    result = {"command": "HF_HUB_OFFLINE=1 python benchmarks/plan_check.py",
              "constants": asdict(constants), "calibration_errors": errors, "checks": checks}
    Path(args.out).write_text(json.dumps(result, indent=1))
    lines = ["| devices | paper | plan | error |", "|---|---|---|---|"]
    lines += [f"| {c['devices']} | {c['paper']}× | {c['plan']}× | {c['error']:+.0%} |" for c in checks]
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n\n" + "\n\n".join(tables) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
