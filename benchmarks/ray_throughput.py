"""Throughput of the bench on Ray against one process on this machine: the same (model, recipe) rows made by one
process with all the cores' threads, and by a local Ray with one single-threaded worker per core. Wall time of the
whole run (model loads, the baseline timed beside each recipe in every task, sample generation, scoring), rows per
minute, and whether the quality numbers agree (the thread count changes float reductions, so bits may not).

    HF_HUB_OFFLINE=1 python benchmarks/ray_throughput.py [--samples 10] [--steps 20] \\
        [--out benchmarks/results/ray_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from effdiff.bench.runner import run_bench
from effdiff.bench.store import ResultsStore
from effdiff.host import simd

RECIPES = ["dpmpp2m:steps=20", "deepcache:interval=3", "fbcache", "tome"]


def timed_run(folder: Path, args, ray_address: str | None) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    run_id = run_bench(models=["tiny-sd", "tiny-dit"], recipes=RECIPES, samples=args.samples, steps=args.steps,
                       out_dir=folder, timing_batch=1, progress=False, ray_address=ray_address)
    seconds = time.perf_counter() - start
    with ResultsStore(folder / "results.sqlite") as store:
        return seconds, store.rows(run_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/ray_throughput.json")
    args = parser.parse_args()
    import ray

    cores = os.cpu_count() or 1
    folder = Path(tempfile.mkdtemp())
    torch.set_num_threads(cores)
    one_seconds, one_rows = timed_run(folder / "one", args, None)
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    try:
        ray_seconds, ray_rows = timed_run(folder / "ray", args, "local")
    finally:
        ray.shutdown()
    fid = {(r["model"], r["recipe"]): r["metrics"].get("fid") for r in one_rows}
    fid_gap = max(abs(r["metrics"].get("fid", 0) - (fid[(r["model"], r["recipe"])] or 0)) for r in ray_rows)
    result = {"command": f"HF_HUB_OFFLINE=1 python benchmarks/ray_throughput.py --samples {args.samples} "
                         f"--steps {args.steps}", "cores": cores, "recipes": RECIPES, "models": ["tiny-sd", "tiny-dit"],
              "cpu_flags": simd(),
              "one_process": {"threads": cores, "seconds": one_seconds, "rows": len(one_rows),
                              "rows_per_minute": 60 * len(one_rows) / one_seconds},
              "ray": {"workers": cores, "threads_per_worker": 1, "seconds": ray_seconds, "rows": len(ray_rows),
                      "rows_per_minute": 60 * len(ray_rows) / ray_seconds},
              "largest_fid_difference": fid_gap}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
