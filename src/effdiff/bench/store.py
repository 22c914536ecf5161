"""SQLite results store: every finished (model, recipe) measurement is one row, written at once.

Why SQLite: one file, atomic transactions, queryable history. A run is identified by its run id;
resuming an id skips what is already stored, a new run adds history beside older runs of the same
configuration, and nothing is ever overwritten. Each run records its state (running, complete,
interrupted, failed) and the process that ran it, so ``effdiff report --list`` can say which runs are
worth resuming; a run that failed before writing a row is deleted, so it never hides the last good one.
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
    started TEXT NOT NULL,
    state TEXT,
    ended TEXT,
    pid INTEGER,
    host TEXT
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


# columns added after the first stores were written (older files get them on first open for writing)
_RUN_COLUMNS = {"state": "TEXT", "ended": "TEXT", "pid": "INTEGER", "host": "TEXT"}
RUN_STATES = ("running", "complete", "interrupted", "failed")


class StoreError(ValueError):
    """A store or run that does not exist, or a resume that does not match: a user error, said in one sentence."""


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

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        """Open (and with ``create``, make) the store; ``create=False`` only reads and never writes a file."""
        self.path = Path(path)
        if not create:
            if not self.path.is_file():
                raise StoreError(f"no results store at {self.path}: run `effdiff bench --out {self.path.parent}` "
                                 "first, or point --out at the folder that holds results.sqlite")
            self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path)
        self._conn.row_factory = sqlite3.Row
        if create:
            with self._conn:
                self._conn.executescript(SCHEMA)
                have = {r["name"] for r in self._conn.execute("PRAGMA table_info(runs)")}
                for name, sql_type in _RUN_COLUMNS.items():
                    if name not in have:
                        self._conn.execute(f"ALTER TABLE runs ADD COLUMN {name} {sql_type}")

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start_run(self, config: dict[str, Any]) -> str:
        """Register a new run of ``config`` (state running, this process) and return its id."""
        run_id = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        with self._conn:
            self._conn.execute("INSERT INTO runs (run_id, config_hash, config_json, started, state, pid, host) "
                               "VALUES (?, ?, ?, ?, 'running', ?, ?)",
                               (run_id, config_hash(config), json.dumps(config, sort_keys=True, default=str),
                                datetime.now(timezone.utc).isoformat(), os.getpid(), platform.node()))
        return run_id

    def check_resumable(self, run_id: str, config: dict[str, Any]) -> None:
        """Refuse a missing id (listing the stored runs) or a configuration other than the run's."""
        row = self._conn.execute("SELECT config_hash FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise StoreError(f"no run {run_id!r} to resume in {self.path}; {self._runs_sentence()}")
        if row["config_hash"] != config_hash(config):
            raise StoreError(f"run {run_id!r} was started with a different configuration; resume it with the same "
                             "models, recipes, samples and steps (or give only --resume), or start a new run")

    def resume_run(self, run_id: str, config: dict[str, Any]) -> str:
        """Mark a stored run of the same configuration running again."""
        self.check_resumable(run_id, config)
        self.set_state(run_id, "running")
        return run_id

    def set_state(self, run_id: str, state: str) -> None:
        """Record how a run stands; any state but running also stamps when it ended."""
        if state not in RUN_STATES:
            raise ValueError(f"unknown run state {state!r}; one of {', '.join(RUN_STATES)}")
        ended = None if state == "running" else datetime.now(timezone.utc).isoformat()
        with self._conn:
            self._conn.execute("UPDATE runs SET state = ?, ended = ?, pid = ?, host = ? WHERE run_id = ?",
                               (state, ended, os.getpid(), platform.node(), run_id))

    def delete_if_empty(self, run_id: str) -> bool:
        """Forget a run that wrote no row (it failed before measuring anything); True if it was deleted."""
        if self._conn.execute("SELECT 1 FROM results WHERE run_id = ? LIMIT 1", (run_id,)).fetchone():
            return False
        with self._conn:
            self._conn.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))
        return True

    def _runs_sentence(self) -> str:
        ids = self.runs()
        if not ids:
            return "the store holds no runs"
        shown = ", ".join(ids[-8:])
        return f"stored runs (newest last): {shown}" + (f" and {len(ids) - 8} older" if len(ids) > 8 else "")

    def check_run(self, run_id: str) -> None:
        """Refuse an id that is not stored, naming the ones that are."""
        if self._conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is None:
            raise StoreError(f"no run {run_id!r} in {self.path}; {self._runs_sentence()}")

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
        """The newest run that stored at least one row (an empty run never hides the last good one)."""
        row = self._conn.execute("SELECT r.run_id FROM runs r WHERE EXISTS (SELECT 1 FROM results x WHERE "
                                 "x.run_id = r.run_id) ORDER BY r.started DESC, r.rowid DESC LIMIT 1").fetchone()
        return row["run_id"] if row else None

    def summaries(self) -> list[dict[str, Any]]:
        """Every run, oldest first: id, start, state (killed when its process is gone), rows stored of expected."""
        out = []
        for run in self._conn.execute("SELECT * FROM runs ORDER BY started, rowid"):
            run = dict(run)
            config = json.loads(run["config_json"])
            expected = len(config.get("models", ())) * len(config.get("recipes", ())) or None
            stored = self._conn.execute("SELECT COUNT(*) AS n FROM results WHERE run_id = ?",
                                        (run["run_id"],)).fetchone()["n"]
            out.append({"run_id": run["run_id"], "started": run["started"], "rows": stored, "expected": expected,
                        "state": _state(run.get("state"), run.get("pid"), run.get("host"), stored, expected),
                        "models": config.get("models"), "quick": config.get("quick")})
        return out


def _state(state: str | None, pid: int | None, host: str | None, stored: int, expected: int | None) -> str:
    """A stored state, corrected for a process that died without saying so (kill -9, power loss)."""
    if state is None:  # written before runs had a state
        return "complete" if expected is not None and stored >= expected else "unknown"
    if state == "running" and pid is not None and host == platform.node() and not _alive(pid):
        return "killed"
    return state


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
