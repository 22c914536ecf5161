"""Per-call time of the bundled denoisers, eager against ``torch.compile`` (inductor), at batch 1 and 2.

Why it exists: a 4-step student's speed-up over DDIM 50 + CFG is bounded by how much a CFG call (batch 2) costs
over a batch-1 call, and on these 1.3–2.5 M-parameter models that is mostly per-call overhead, which compile
removes. Alternating blocks of 10 calls, median of 7, after a warm-up that includes the compilation.

    HF_HUB_OFFLINE=1 python benchmarks/compile_per_call.py [--out benchmarks/results/compile_per_call.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import effdiff
from effdiff.adapters import adapter_for
from effdiff.eval.cost import time_alternating
from effdiff.host import cpu_description

CALLS_PER_BLOCK = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-sd", "tiny-dit"])
    parser.add_argument("--out", default="benchmarks/results/compile_per_call.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for model in args.models:
        denoiser = effdiff.load(model).denoiser
        compiled = torch.compile(denoiser)
        for batch in (1, 2):
            call = adapter_for(denoiser).example_call(batch)
            with torch.no_grad():
                eager_t, compiled_t = time_alternating(
                    lambda: [denoiser(**call) for _ in range(CALLS_PER_BLOCK)],  # noqa: B023 - used in this loop
                    lambda: [compiled(**call) for _ in range(CALLS_PER_BLOCK)],  # noqa: B023
                    reps=7, warmup=2)
            eager_ms, compiled_ms = (1e3 * t.median / CALLS_PER_BLOCK for t in (eager_t, compiled_t))
            rows.append({"model": model, "batch": batch, "eager_ms": round(eager_ms, 2),
                         "compiled_ms": round(compiled_ms, 2), "speedup": round(eager_ms / compiled_ms, 3)})
            print(f"{model} batch {batch}: eager {eager_ms:.1f} ms, compiled {compiled_ms:.1f} ms, "
                  f"{eager_ms / compiled_ms:.2f}x", flush=True)
    Path(args.out).write_text(json.dumps({
        "benchmark": "compile_per_call", "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{cpu_description()} threads={torch.get_num_threads()}",
        "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
