import json
import sqlite3

import pytest

from effdiff.bench.store import SCHEMA, Environment, ResultsStore, StoreError, config_hash

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
        with pytest.raises(sqlite3.IntegrityError):
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
        store._conn.execute("UPDATE runs SET pid = ? WHERE run_id = ?", (int(dead), killed))
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
        conn.executescript(SCHEMA.replace(",\n    state TEXT,\n    ended TEXT,\n    pid INTEGER,\n    host TEXT", ""))
        conn.execute("INSERT INTO runs VALUES ('old', 'h', ?, '2026-01-01')", (json.dumps(CONFIG),))
    with ResultsStore(path) as store:
        assert store.summaries()[0]["state"] == "unknown"
        store.set_state("old", "complete")
        assert store.summaries()[0]["state"] == "complete"


def test_config_hash_ignores_key_order():
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})
