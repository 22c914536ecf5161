import sqlite3

import pytest

from effdiff.bench.store import Environment, ResultsStore, config_hash

ENV = Environment("2.x", "0.x", "0.1", 2, "float32", "cpu", "test machine")
CONFIG = {"models": ["m"], "recipes": ["", "a", "b"], "samples": 4}


def _run(store: ResultsStore, run_id: str | None, stop_after: int | None = None) -> str:
    """Writes one row per recipe, skipping finished ones; raises midway to simulate an interruption."""
    run_id = store.start_run(CONFIG, run_id)
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
    with pytest.raises(KeyboardInterrupt):
        _run(store, "run-1", stop_after=2)
    store.close()  # the process "dies": only committed rows survive
    with ResultsStore(path) as again:
        assert again.finished("run-1") == {("m", ""), ("m", "a")}
        before = {r["recipe"]: r["id"] for r in again.rows("run-1")}
        _run(again, "run-1")
        rows = again.rows("run-1")
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
            store.start_run({**CONFIG, "samples": 8}, run_id)


def test_config_hash_ignores_key_order():
    assert config_hash({"a": 1, "b": 2}) == config_hash({"b": 2, "a": 1})
