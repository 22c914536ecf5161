"""``effdiff bench --ray [ADDRESS]``: the bench's (model, recipe) measurements as Ray tasks, one writer.

Why Ray and not a home-made pool: it schedules tasks over the cores of one machine or the machines of a cluster
(``ray start --head`` / ``--address``), retries a task whose worker died, and hands results back to the driver —
the one process that writes rows into the results store, so a SQLite file is never written by two machines and a
PostgreSQL store (``--store``) sees one writer per run.

Each task is one recipe on one model and measures it exactly as the single-process bench does: the baseline is
timed beside the recipe in the task's own process (speed-ups stay paired, MEASURE.md rule 2), and the quality
metrics compare its samples with the baseline's, which every task reads from the run's image folder (the baseline
task of a model runs first and writes them; on a machine that cannot see the folder they are generated again, the
same for the same seeds). So a Ray run gives the single-process rows: the same quality numbers, speed-ups measured
the same way. Resuming works as for any run — only the missing (model, recipe) pairs are scheduled; a killed
driver loses no stored row, a lost worker's task is retried.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from effdiff.bench.runner import (
    BenchConfig,
    _bench_model,
    _Judges,
    image_dir,
    stored_baseline_latency,
)
from effdiff.bench.store import Environment, ResultsStore


def measure_task(model: str, recipe: str, config: BenchConfig, folder: str,
                 baseline_latency: float | None) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """One (model, recipe) measured in this process; its rows as (recipe, metric set, metrics, environment)."""
    from dataclasses import asdict

    from effdiff.api import accelerate
    from effdiff.zoo import load

    rows: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = []
    _bench_model(model, [recipe], config, load, accelerate,
                 lambda r, metric_set, metrics, env: rows.append((r, metric_set, metrics, asdict(env))),
                 baseline_latency, Path(folder), _Judges(), lambda _name: None, lambda: None)
    return rows


def run_on_ray(config: BenchConfig, store: ResultsStore, run_id: str, out_dir: Path, address: str | None,
               cpus_per_task: int = 1, progress: bool = True) -> None:
    """Schedule every (model, recipe) of ``run_id`` not stored yet on Ray; write each row as its task returns."""
    import ray

    if not ray.is_initialized():
        ray.init(address=None if address in (None, "", "local") else address, include_dashboard=False,
                 log_to_driver=False)
    task = ray.remote(num_cpus=cpus_per_task, max_retries=2)(measure_task)
    done = store.finished(run_id)
    pending: dict[Any, tuple[str, str]] = {}
    waiting: dict[str, list[str]] = {}  # recipes of a model held back until its baseline task wrote the samples

    def submit(model: str, recipe: str) -> None:
        latency = stored_baseline_latency(store, run_id, model)
        ref = task.options(runtime_env={"env_vars": {"OMP_NUM_THREADS": str(cpus_per_task)}}).remote(
            model, recipe, config, str(image_dir(out_dir, run_id, model)), latency)
        pending[ref] = (model, recipe)

    for model in config.models:
        todo = [r for r in config.recipes if (model, r) not in done]
        if "" in todo:
            submit(model, "")
            waiting[model] = [r for r in todo if r]
        else:
            for recipe in todo:
                submit(model, recipe)
    total, finished = len(pending) + sum(len(v) for v in waiting.values()), 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        model, recipe = pending.pop(ready[0])
        for row_recipe, metric_set, metrics, env in ray.get(ready[0]):
            store.write(run_id, model, row_recipe, metric_set, metrics, Environment(**env))
        finished += 1
        if progress:
            print(f"  ray: {model} {recipe or 'baseline'} stored ({finished}/{total})", flush=True)
        for held in waiting.pop(model, []) if not recipe else []:
            submit(model, held)
