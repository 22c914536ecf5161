"""Results store: every finished (model, recipe) measurement is one row, written at once.

Why SQLite by default: one file, atomic transactions, queryable history; a database URL (``--store
postgresql://…``) puts the same tables in PostgreSQL, through SQLAlchemy Core, for many writers on many
machines. A run is identified by its run id; resuming an id skips what is already stored, a new run adds history
beside older runs of the same configuration, and nothing is ever overwritten. Each run records its state
(running, complete, interrupted, failed) and the process that ran it, so ``effdiff report --list`` can say which
runs are worth resuming; a run that failed before writing a row is deleted, so it never hides the last good one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# columns added after the first stores were written (older files get them on first open for writing)
_RUN_COLUMNS = {"state": "TEXT", "ended": "TEXT", "pid": "INTEGER", "host": "TEXT"}
RUN_STATES = ("running", "complete", "interrupted", "failed")


def _tables() -> tuple[Any, Any, Any]:
    """(metadata, runs, results): the schema, in SQLAlchemy Core (one definition for SQLite and PostgreSQL)."""
    from sqlalchemy import Column, ForeignKey, Integer, MetaData, Table, Text, UniqueConstraint

    meta = MetaData()
    runs = Table("runs", meta, Column("run_id", Text, primary_key=True), Column("config_hash", Text, nullable=False),
                 Column("config_json", Text, nullable=False), Column("started", Text, nullable=False),
                 Column("state", Text), Column("ended", Text), Column("pid", Integer), Column("host", Text))
    results = Table("results", meta, Column("id", Integer, primary_key=True, autoincrement=True),
                    Column("run_id", Text, ForeignKey("runs.run_id"), nullable=False),
                    Column("model", Text, nullable=False), Column("recipe", Text, nullable=False),
                    Column("metric_set", Text, nullable=False), Column("torch_version", Text),
                    Column("diffusers_version", Text), Column("effdiff_version", Text), Column("threads", Integer),
                    Column("dtype", Text), Column("device", Text), Column("machine", Text),
                    Column("timestamp", Text, nullable=False), Column("config_hash", Text, nullable=False),
                    Column("metrics_json", Text, nullable=False),
                    UniqueConstraint("run_id", "model", "recipe", "metric_set"))
    return meta, runs, results


def is_url(location: str | Path) -> bool:
    """A database URL (``postgresql://…``, ``sqlite:///…``) rather than a file path."""
    return "://" in str(location)


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
    """Append-only results; each ``write`` is its own committed transaction.

    ``location`` is a file (SQLite, the embedded default) or a database URL: ``postgresql://user@host/db`` puts the
    rows where many machines' workers can write at once. One schema, through SQLAlchemy Core, for both.
    """

    def __init__(self, location: str | Path, *, create: bool = True) -> None:
        """Open (and with ``create``, make) the store; ``create=False`` only reads and never writes a file."""
        from sqlalchemy import create_engine, event

        self.url = is_url(location)
        self.path = Path(str(location)) if not self.url else str(location)
        if self.url:
            target = str(location)
        elif not create:
            if not Path(self.path).is_file():
                raise StoreError(f"no results store at {self.path}: run `effdiff bench --out {Path(self.path).parent}` "
                                 "first, or point --out at the folder that holds results.sqlite")
            target = f"sqlite:///file:{Path(self.path).resolve()}?mode=ro&uri=true"
        else:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            target = f"sqlite:///{Path(self.path).resolve()}"
        sqlite = target.startswith("sqlite")
        try:
            self.engine = create_engine(target, **({"connect_args": {"timeout": 60}} if sqlite else {}))
        except Exception as exc:  # a malformed URL or a missing driver
            raise StoreError(f"cannot open the results store {location}: {exc}") from None
        if sqlite:  # writers from several processes wait for each other instead of failing
            event.listen(self.engine, "connect", lambda conn, _: conn.execute("PRAGMA busy_timeout = 60000"))
        self.meta, self.runs_table, self.results_table = _tables()
        if create:
            self.meta.create_all(self.engine)
            self._add_missing_run_columns()

    def _add_missing_run_columns(self) -> None:
        from sqlalchemy import inspect, text

        have = {c["name"] for c in inspect(self.engine).get_columns("runs")}
        with self.engine.begin() as conn:
            for name, sql_type in _RUN_COLUMNS.items():
                if name not in have:
                    conn.execute(text(f"ALTER TABLE runs ADD COLUMN {name} {sql_type}"))

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _one(self, query: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(query).mappings().first()

    def _all(self, query: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(query).mappings())

    def start_run(self, config: dict[str, Any]) -> str:
        """Register a new run of ``config`` (state running, this process) and return its id."""
        run_id = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        with self.engine.begin() as conn:
            conn.execute(self.runs_table.insert().values(
                run_id=run_id, config_hash=config_hash(config), config_json=json.dumps(config, sort_keys=True,
                                                                                         default=str),
                started=datetime.now(timezone.utc).isoformat(), state="running", pid=os.getpid(),
                host=platform.node()))
        return run_id

    def check_resumable(self, run_id: str, config: dict[str, Any]) -> None:
        """Refuse a missing id (listing the stored runs) or a configuration other than the run's."""
        from sqlalchemy import select

        runs = self.runs_table
        row = self._one(select(runs.c.config_hash).where(runs.c.run_id == run_id))
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
        runs = self.runs_table
        with self.engine.begin() as conn:
            conn.execute(runs.update().where(runs.c.run_id == run_id).values(
                state=state, ended=ended, pid=os.getpid(), host=platform.node()))

    def delete_if_empty(self, run_id: str) -> bool:
        """Forget a run that wrote no row (it failed before measuring anything); True if it was deleted."""
        from sqlalchemy import select

        results = self.results_table
        if self._one(select(results.c.id).where(results.c.run_id == run_id).limit(1)) is not None:
            return False
        with self.engine.begin() as conn:
            conn.execute(self.runs_table.delete().where(self.runs_table.c.run_id == run_id))
        return True

    def _runs_sentence(self) -> str:
        ids = self.runs()
        if not ids:
            return "the store holds no runs"
        shown = ", ".join(ids[-8:])
        return f"stored runs (newest last): {shown}" + (f" and {len(ids) - 8} older" if len(ids) > 8 else "")

    def check_run(self, run_id: str) -> None:
        """Refuse an id that is not stored, naming the ones that are."""
        from sqlalchemy import select

        if self._one(select(self.runs_table.c.run_id).where(self.runs_table.c.run_id == run_id)) is None:
            raise StoreError(f"no run {run_id!r} in {self.path}; {self._runs_sentence()}")

    def run_config(self, run_id: str) -> dict[str, Any]:
        from sqlalchemy import select

        row = self._one(select(self.runs_table.c.config_json).where(self.runs_table.c.run_id == run_id))
        if row is None:
            raise KeyError(f"no run {run_id!r} in {self.path}")
        return json.loads(row["config_json"])

    def finished(self, run_id: str) -> set[tuple[str, str]]:
        """(model, recipe) pairs of this run that already have a stored row."""
        from sqlalchemy import select

        results = self.results_table
        rows = self._all(select(results.c.model, results.c.recipe).where(results.c.run_id == run_id))
        return {(r["model"], r["recipe"]) for r in rows}

    def write(self, run_id: str, model: str, recipe: str, metric_set: str, metrics: dict[str, Any],
              env: Environment) -> None:
        """Insert one row and commit it now, so that an interruption later loses nothing."""
        from sqlalchemy.exc import IntegrityError

        config = self.run_config(run_id)
        try:
            self._insert_row(run_id, model, recipe, metric_set, metrics, env, config)
        except IntegrityError:
            raise StoreError(f"run {run_id!r} already has a {metric_set} row for {model} {recipe or 'baseline'}: "
                             "rows are never overwritten (start a new run for a new measurement)") from None

    def _insert_row(self, run_id: str, model: str, recipe: str, metric_set: str, metrics: dict[str, Any],
                    env: Environment, config: dict[str, Any]) -> None:
        with self.engine.begin() as conn:
            conn.execute(self.results_table.insert().values(
                run_id=run_id, model=model, recipe=recipe, metric_set=metric_set, torch_version=env.torch_version,
                diffusers_version=env.diffusers_version, effdiff_version=env.effdiff_version, threads=env.threads,
                dtype=env.dtype, device=env.device, machine=env.machine,
                timestamp=datetime.now(timezone.utc).isoformat(), config_hash=config_hash(config),
                metrics_json=json.dumps(_jsonable(metrics), sort_keys=True)))

    def rows(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Rows (metrics decoded) of one run, or of all runs, oldest first."""
        from sqlalchemy import select

        results = self.results_table
        query = select(results)
        if run_id is not None:
            query = query.where(results.c.run_id == run_id)
        out = []
        for row in self._all(query.order_by(results.c.id)):
            item = dict(row)
            item["metrics"] = json.loads(item.pop("metrics_json"))
            out.append(item)
        return out

    def runs(self, config: dict[str, Any] | None = None) -> list[str]:
        """Run ids, oldest first; only those of ``config`` when given (its history)."""
        from sqlalchemy import select

        runs = self.runs_table
        query = select(runs.c.run_id)
        if config is not None:
            query = query.where(runs.c.config_hash == config_hash(config))
        return [r["run_id"] for r in self._all(query.order_by(runs.c.started, runs.c.run_id))]

    def latest_run(self) -> str | None:
        """The newest run that stored at least one row (an empty run never hides the last good one)."""
        from sqlalchemy import exists, select

        runs, results = self.runs_table, self.results_table
        row = self._one(select(runs.c.run_id).where(exists().where(results.c.run_id == runs.c.run_id))
                        .order_by(runs.c.started.desc(), runs.c.run_id.desc()).limit(1))
        return row["run_id"] if row else None

    def summaries(self) -> list[dict[str, Any]]:
        """Every run, oldest first: id, start, state (killed when its process is gone), rows stored of expected."""
        from sqlalchemy import func, select

        runs, results = self.runs_table, self.results_table
        counts = {r["run_id"]: r["n"] for r in self._all(
            select(results.c.run_id, func.count().label("n")).group_by(results.c.run_id))}
        out = []
        for run in self._all(select(runs).order_by(runs.c.started, runs.c.run_id)):
            run = dict(run)
            config = json.loads(run["config_json"])
            expected = len(config.get("models", ())) * len(config.get("recipes", ())) or None
            stored = counts.get(run["run_id"], 0)
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
