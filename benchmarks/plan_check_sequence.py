"""``effdiff plan``'s sequence-parallel rows against the latencies the xDiT project published for Ulysses and Ring
on FLUX.1 and PixArt-α (eager PyTorch runs: the plan's kernel constants are fitted to eager single-device steps).
Paper speed-up = one-GPU latency / N-GPU latency as published; error = plan / paper − 1.

Sources (read 2026-12-06; figures are images with the values printed on their bars):

- ``F-H100``: xdit-project/xDiT ``docs/performance/flux.md`` (248abec), "latency (in seconds) using different USP
  strategies on 4xH100": FLUX.1-dev, 1024 px, 28 steps.
- ``F-A100-dev``: the same doc's figure ``Flux-A100-crop.png`` (xdit_assets), 1024 px panel, 8 × A100 NVLink, 28
  steps; its best hybrid at 8 GPUs is plain Ulysses (the doc says so). Also in the xDiT paper, arXiv 2411.01738.
- ``F-A100-schnell``: ``flux.md`` at bf5e294, figure ``flux_a100.jpg``: FLUX.1-schnell (4 steps; same architecture
  as the plan's flux-dev-arch), 8 × A100 80GB NVLink, all parallelism to Ulysses. Its latencies include the text
  encoders and the VAE, which do not shrink with more GPUs; the plan prices the denoising steps only.
- ``P-NV`` / ``P-PCIe``: ``docs/performance/pixart_alpha_legacy.md`` (9675e39), figures ``latency-A100-NVLink.png``
  (8 × A100-80GB NVLink) and ``latency-A100-PCIe.png`` (4 × A100-80GB PCIe; the plan knows the SXM A100 only):
  PixArt-α, 20 DPM steps, fp16, CFG batch 2, no VAE decode. "Ulysses=1" there is ring over every GPU
  (``legacy/pipefuser/utils.py``: ring degree = world size / Ulysses degree). Both reuse the same one-GPU times.

  The same table has USP's hybrid ``Ulysses-2 x Ring-2`` on the 4 H100s (5.19 s): ``seqparallel:ring=2`` on 4 ranks.

Not compared: xDiT's torch.compile runs (the plan's constants are eager ones) and hybrids read off figures only.

    HF_HUB_OFFLINE=1 python benchmarks/plan_check_sequence.py [--out benchmarks/results/plan_check_sequence.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import NamedTuple

from effdiff.plan.estimate import estimates, fitted_constants, resolve


class Published(NamedTuple):
    source: str
    model: str
    px: int
    steps: int
    devices: int
    device: str
    link: str
    method: str  # "ulysses", "ring" or "ulysses2xring2" (USP's hybrid)
    one_gpu_s: float
    split_s: float


FLUX, PIXART = "flux-dev-arch", "pixart-alpha-arch"
PUBLISHED = [
    Published("F-H100", FLUX, 1024, 28, 2, "h100", "nvlink", "ulysses", 6.71, 4.38),
    Published("F-H100", FLUX, 1024, 28, 2, "h100", "nvlink", "ring", 6.71, 5.31),
    Published("F-H100", FLUX, 1024, 28, 4, "h100", "nvlink", "ulysses", 6.71, 4.24),
    Published("F-H100", FLUX, 1024, 28, 4, "h100", "nvlink", "ring", 6.71, 5.11),
    Published("F-H100", FLUX, 1024, 28, 4, "h100", "nvlink", "ulysses2xring2", 6.71, 5.19),
    Published("F-A100-dev", FLUX, 1024, 28, 8, "a100", "nvlink", "ulysses", 12.77, 4.13),
    Published("F-A100-schnell", FLUX, 1024, 4, 8, "a100", "nvlink", "ulysses", 2.18, 0.93),
    Published("F-A100-schnell", FLUX, 2048, 4, 8, "a100", "nvlink", "ulysses", 11.06, 2.63),
    Published("F-A100-schnell", FLUX, 4096, 4, 4, "a100", "nvlink", "ulysses", 79.03, 20.1),
    Published("F-A100-schnell", FLUX, 4096, 4, 8, "a100", "nvlink", "ulysses", 79.03, 10.63),
    *(Published("P-NV", PIXART, px, 20, 8, "a100", "nvlink", method, one, split)
      for px, method, one, split in ((1024, "ulysses", 2.085, 1.1), (1024, "ring", 2.085, 2.08),
                                     (2048, "ulysses", 16.22, 2.46), (2048, "ring", 16.22, 4.47),
                                     (4096, "ulysses", 183.6, 23.31), (4096, "ring", 183.6, 27.41))),
    *(Published("P-PCIe", PIXART, px, 20, 4, "a100", "pcie4", method, one, split)
      for px, method, one, split in ((1024, "ulysses", 2.085, 1.741), (1024, "ring", 2.085, 2.633),
                                     (2048, "ulysses", 16.22, 7.932), (2048, "ring", 16.22, 11.05),
                                     (4096, "ulysses", 183.6, 59.01), (4096, "ring", 183.6, 65.85))),
]


PLAN_ROW = {"ulysses": lambda n: "seqparallel (Ulysses)", "ring": lambda n: f"seqparallel:ring={n} (ring)",
            "ulysses2xring2": lambda n: "seqparallel:ring=2 (Ulysses 2 × ring 2)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/plan_check_sequence.json")
    args = parser.parse_args()
    constants, _ = fitted_constants()
    planned: dict[tuple, dict[str, float]] = {}
    checks = []
    for row in PUBLISHED:
        key = (row.model, row.px, row.devices, row.device, row.link, row.steps)
        if key not in planned:
            device, link = resolve(row.device, row.link)
            dtype = "bfloat16" if row.model == FLUX else "float16"
            found = estimates(row.model, row.px, row.devices, device, link, constants, steps=row.steps, dtype=dtype)
            planned[key] = {r.method: r.speedup for r in found}
        paper = row.one_gpu_s / row.split_s
        plan = planned[key][PLAN_ROW[row.method](row.devices)]
        checks.append({**row._asdict(), "paper_speedup": round(paper, 2), "plan_speedup": round(plan, 2),
                       "error": round(plan / paper - 1, 3)})
    within = [abs(c["error"]) <= 0.25 for c in checks]
    result = {"command": "HF_HUB_OFFLINE=1 python benchmarks/plan_check_sequence.py", "checks": checks,
              "within_25_percent": f"{sum(within)} of {len(within)}"}
    Path(args.out).write_text(json.dumps(result, indent=1))
    lines = ["| source | model | px | steps | GPUs | link | method | paper | plan | error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {c['source']} | {c['model']} | {c['px']} | {c['steps']} | {c['devices']} × {c['device'].upper()} | "
              f"{c['link']} | {c['method']} | {c['paper_speedup']:.2f}× ({c['one_gpu_s']} → {c['split_s']} s) | "
              f"{c['plan_speedup']:.2f}× | {c['error']:+.0%} |" for c in checks]
    lines.append(f"\nwithin ±25 %: {result['within_25_percent']}")
    Path(args.out).with_suffix(".md").write_text(__doc__.split("\n    HF_HUB")[0] + "\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
