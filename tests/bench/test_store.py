import json
import sqlite3

import pytest

from effdiff.bench.store import Environment, ResultsStore, StoreError, config_hash

FIRST_SCHEMA = """
CREATE TABLE runs (run_id TEXT PRIMARY KEY, config_hash TEXT NOT NULL, config_json TEXT NOT NULL,
                   started TEXT NOT NULL);
CREATE TABLE results (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL REFERENCES runs(run_id),
                      model TEXT NOT NULL, recipe TEXT NOT NULL, metric_set TEXT NOT NULL, torch_version TEXT,
                      diffusers_version TEXT, effdiff_version TEXT, threads INTEGER, dtype TEXT, device TEXT,
                      machine TEXT, timestamp TEXT NOT NULL, config_hash TEXT NOT NULL, metrics_json TEXT NOT NULL,
                      UNIQUE (run_id, model, recipe, metric_set));
"""  # the schema of the first stores: no state, pid or host
ENV = Environment("2.x", "0.x", "0.1", 2, "float32", "cpu", "test machine")
CONFIG = {"models": ["m"], "recipes": ["", "a", "b"], "samples": 4}


def _run(store: ResultsStore, run_id: str | None, stop_after: int | None = None) -> str:
    """Writes one row per recipe, skipping finished ones; raises midway to simulate an interruption."""
    run_id = store.start_run(CONFIG) if run_id is None else store.resume_run(run_id, CONFIG)
    done = store.finished(run_id)
    for i, recipe in enumerate(CONFIG["recipes"]):
        if ("m", recipe) in done:
            continue
        if stop_after is not None and i >= stop_after:
            raise KeyboardInterrupt
        store.write(run_id, "m", recipe, "full", {"speedup": 1.0 + i, "fid": float("nan")}, ENV)
    return run_id


def test_interrupted_run_resumes_without_loss(tmp_path):
    path = tmp_path / "r.sqlite"
    store = ResultsStore(path)
    run_id = store.start_run(CONFIG)
    with pytest.raises(KeyboardInterrupt):
        _run(store, run_id, stop_after=2)
    store.close()  # the process "dies": only committed rows survive
    with ResultsStore(path) as again:
        assert again.finished(run_id) == {("m", ""), ("m", "a")}
        before = {r["recipe"]: r["id"] for r in again.rows(run_id)}
        _run(again, run_id)
        rows = again.rows(run_id)
    assert [r["recipe"] for r in rows] == ["", "a", "b"]
    assert {r["recipe"]: r["id"] for r in rows if r["recipe"] in before} == before  # untouched
    assert rows[0]["metrics"] == {"speedup": 1.0, "fid": None}  # NaN stored as JSON null
    assert rows[0]["threads"] == 2 and rows[0]["config_hash"] == config_hash(CONFIG)


def test_reruns_are_history_not_overwrites(tmp_path):
    with ResultsStore(tmp_path / "r.sqlite") as store:
        first, second = _run(store, None), _run(store, None)
        assert first != second
        assert store.runs(CONFIG) == [first, second]
        assert len(store.rows()) == 6 and len(store.rows(second)) == 3
        assert store.latest_run() == second
        with pytest.raises(StoreError, match="already has a full row for m a: rows are never overwritten"):
            store.write(first, "m", "a", "full", {}, ENV)


def test_resume_with_other_config_is_refused(tmp_path):
    with ResultsStore(tmp_path / "r.sqlite") as store:
        run_id = store.start_run(CONFIG)
        with pytest.raises(ValueError, match="different configuration"):
            store.resume_run(run_id, {**CONFIG, "samples": 8})


def test_resuming_a_mistyped_id_is_refused_naming_the_stored_runs(tmp_path):
    with ResultsStore(tmp_path / "r.sqlite") as store:
        run_id = store.start_run(CONFIG)
        with pytest.raises(StoreError, match=f"no run 'typo'.*{run_id}"):
            store.resume_run("typo", CONFIG)
        assert store.runs() == [run_id]  # nothing registered under the typo


def test_an_empty_run_never_hides_the_last_good_one(tmp_path):
    with ResultsStore(tmp_path / "r.sqlite") as store:
        good = _run(store, None)
        store.set_state(good, "complete")
        empty = store.start_run(CONFIG)
        assert store.latest_run() == good
        assert store.delete_if_empty(empty) and store.runs() == [good]
        assert not store.delete_if_empty(good)


def test_summaries_say_how_each_run_stands(tmp_path):
    import subprocess
    import sys

    with ResultsStore(tmp_path / "r.sqlite") as store:
        done = _run(store, None)
        store.set_state(done, "complete")
        stopped = store.start_run(CONFIG)
        store.set_state(stopped, "interrupted")
        killed = store.start_run(CONFIG)
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout.strip()
        with store.engine.begin() as conn:
            conn.execute(store.runs_table.update().where(store.runs_table.c.run_id == killed).values(pid=int(dead)))
        live = store.start_run(CONFIG)
        states = {s["run_id"]: (s["state"], s["rows"], s["expected"]) for s in store.summaries()}
    assert states == {done: ("complete", 3, 3), stopped: ("interrupted", 0, 3), killed: ("killed", 0, 3),
                      live: ("running", 0, 3)}


def test_reading_a_missing_store_creates_nothing(tmp_path):
    with pytest.raises(StoreError, match="no results store"):
        ResultsStore(tmp_path / "missing" / "results.sqlite", create=False)
    assert not (tmp_path / "missing").exists()


def test_stores_written_before_run_states_still_open(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:  # the schema of the first stores: no state, pid or host
        conn.executescript(FIRST_SCHEMA)
        conn.execute("INSERT INTO runs VALUES ('old', 'h', ?, '2026-01-01')", (json.dumps(CONFIG),))
    with ResultsStore(path) as store:
        assert store.summaries()[0]["state"] == "unknown"
        store.set_state("old", "complete")
        assert store.summaries()[0]["state"] == "complete"


def test_config_hash_ignores_key_order():
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})


def _writer(location: str, run_id: str, worker: int, count: int) -> None:
    with ResultsStore(location) as store:
        for i in range(count):
            store.write(run_id, f"m{worker}", f"r{i}", "full", {"i": i}, ENV)


def _concurrent_writes_lose_nothing(location: str) -> None:
    import multiprocessing

    with ResultsStore(location) as store:
        run_id = store.start_run(CONFIG)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_writer, args=(location, run_id, w, 25)) for w in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    with ResultsStore(location) as store:
        rows = store.rows(run_id)
    assert len(rows) == 50 and {(r["model"], r["recipe"]) for r in rows} == {
        (f"m{w}", f"r{i}") for w in range(2) for i in range(25)}


def test_two_processes_writing_one_sqlite_store_lose_nothing(tmp_path):
    _concurrent_writes_lose_nothing(str(tmp_path / "shared.sqlite"))


def test_a_postgresql_store_keeps_runs_resumes_and_takes_concurrent_writers(postgres_url):
    with ResultsStore(postgres_url) as store:
        run_id = store.start_run(CONFIG)
        with pytest.raises(KeyboardInterrupt):
            _run(store, run_id, stop_after=2)
        assert store.finished(run_id) == {("m", ""), ("m", "a")}
        _run(store, run_id)
        assert [r["metrics"]["speedup"] for r in store.rows(run_id)] == [1.0, 2.0, 3.0]
        assert store.latest_run() == run_id and store.summaries()[-1]["rows"] == 3
        with pytest.raises(StoreError, match="rows are never overwritten"):
            store.write(run_id, "m", "a", "full", {}, ENV)
    _concurrent_writes_lose_nothing(postgres_url)


def test_a_bad_url_is_refused_clearly():
    with pytest.raises(StoreError, match="cannot open the results store nosuchdb://x"):
        ResultsStore("nosuchdb://x")
