"""SQLite results store: every finished (model, recipe) measurement is one row, written at once.

Why SQLite: one file, atomic transactions, queryable history. A run is identified by its run id;
rerunning the same id skips what is already stored (resume), a new id adds history beside older
runs of the same configuration, and nothing is ever overwritten.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sqlite3
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    config_hash TEXT NOT NULL,
    config_json TEXT NOT NULL,
    started TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    model TEXT NOT NULL,
    recipe TEXT NOT NULL,
    metric_set TEXT NOT NULL,
    torch_version TEXT, diffusers_version TEXT, effdiff_version TEXT,
    threads INTEGER, dtype TEXT, device TEXT, machine TEXT,
    timestamp TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    metrics_json TEXT NOT NULL,
    UNIQUE (run_id, model, recipe, metric_set)
);
"""


def config_hash(config: dict[str, Any]) -> str:
    """Stable short hash of a configuration (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    """NaN/inf are not JSON: store them as null so that every reader can parse the row."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


@dataclass(frozen=True)
class Environment:
    """Where and with what a row was measured (MEASURE.md rule 1)."""

    torch_version: str
    diffusers_version: str
    effdiff_version: str
    threads: int
    dtype: str
    device: str
    machine: str

    @classmethod
    def current(cls, dtype: str = "float32", device: str = "cpu") -> Environment:
        import diffusers
        import torch

        try:
            from importlib.metadata import version

            effdiff_version = version("effdiff")
        except Exception:  # running from a source tree that is not installed
            effdiff_version = "0.1.0+src"
        cpu = platform.processor() or platform.machine()
        if device.startswith("cuda") and torch.cuda.is_available():
            cpu = f"{cpu} / {torch.cuda.get_device_name()}"
        return cls(torch.__version__, diffusers.__version__, effdiff_version, torch.get_num_threads(),
                   dtype, device, f"{platform.node()} {cpu} ({os.cpu_count()} cpus)")


class ResultsStore:
    """Append-only results; each ``write`` is its own committed transaction."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path)
        self._conn.row_factory = sqlite3.Row
        with self._conn:
            self._conn.executescript(SCHEMA)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start_run(self, config: dict[str, Any], run_id: str | None = None) -> str:
        """Register a run (new id unless ``run_id`` is given); resuming checks the config matches."""
        digest = config_hash(config)
        if run_id is not None:
            row = self._conn.execute("SELECT config_hash FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is not None:
                if row["config_hash"] != digest:
                    raise ValueError(f"run {run_id!r} was started with a different configuration; "
                                     "resume it with the same models, recipes, samples and steps, "
                                     "or start a new run")
                return run_id
        run_id = run_id or datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        with self._conn:
            self._conn.execute("INSERT INTO runs VALUES (?, ?, ?, ?)",
                               (run_id, digest, json.dumps(config, sort_keys=True, default=str),
                                datetime.now(timezone.utc).isoformat()))
        return run_id

    def run_config(self, run_id: str) -> dict[str, Any]:
        row = self._conn.execute("SELECT config_json FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise KeyError(f"no run {run_id!r} in {self.path}")
        return json.loads(row["config_json"])

    def finished(self, run_id: str) -> set[tuple[str, str]]:
        """(model, recipe) pairs of this run that already have a stored row."""
        rows = self._conn.execute("SELECT model, recipe FROM results WHERE run_id = ?", (run_id,))
        return {(r["model"], r["recipe"]) for r in rows}

    def write(self, run_id: str, model: str, recipe: str, metric_set: str, metrics: dict[str, Any],
              env: Environment) -> None:
        """Insert one row and commit it now, so that an interruption later loses nothing."""
        config = self.run_config(run_id)
        with self._conn:
            self._conn.execute(
                "INSERT INTO results (run_id, model, recipe, metric_set, torch_version, diffusers_version, "
                "effdiff_version, threads, dtype, device, machine, timestamp, config_hash, metrics_json) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, model, recipe, metric_set, env.torch_version, env.diffusers_version,
                 env.effdiff_version, env.threads, env.dtype, env.device, env.machine,
                 datetime.now(timezone.utc).isoformat(), config_hash(config),
                 json.dumps(_jsonable(metrics), sort_keys=True)),
            )

    def rows(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Rows (metrics decoded) of one run, or of all runs, oldest first."""
        query, args = "SELECT * FROM results", ()
        if run_id is not None:
            query, args = query + " WHERE run_id = ?", (run_id,)
        out = []
        for row in self._conn.execute(query + " ORDER BY id", args):
            item = dict(row)
            item["metrics"] = json.loads(item.pop("metrics_json"))
            out.append(item)
        return out

    def runs(self, config: dict[str, Any] | None = None) -> list[str]:
        """Run ids, oldest first; only those of ``config`` when given (its history)."""
        if config is None:
            cur: Iterable = self._conn.execute("SELECT run_id FROM runs ORDER BY started, rowid")
        else:
            cur = self._conn.execute("SELECT run_id FROM runs WHERE config_hash = ? ORDER BY started, rowid",
                                     (config_hash(config),))
        return [r["run_id"] for r in cur]

    def latest_run(self) -> str | None:
        ids = self.runs()
        return ids[-1] if ids else None
