"""The CLI driven in-process over generated arguments: never a traceback, never exit 0 on invalid input,
nothing written before validation.

The compute behind each command (``run_bench``, ``generate``, the HTML ``report``) is replaced by a
recorder, so a valid command line ends at exit 0 in microseconds and an invalid one must stop before it.
The oracle (``_expected_ok``) restates the documented rules independently of the code under test.
``EFFDIFF_FUZZ_EXAMPLES`` sets the count: 300 in CI, 10,000 from ``benchmarks/cli_fuzz.sh``.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effdiff.cli import USAGE_ERROR, main

EXAMPLES = int(os.environ.get("EFFDIFF_FUZZ_EXAMPLES", "300"))
RUN_ID = "20261204-120000-abcdef"

numbers = st.one_of(st.integers(-5, 1005).map(str), st.sampled_from(["abc", "1.5", "", "nan", "1e3", "-0"]))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                   st.sampled_from(["4", "0", "-1", "nan", "inf", "-inf", "x", "1e400"]))
recipes = st.sampled_from(["", "ddim", "dpmpp2m:steps=20", "dpm++", "deepcache:interval=3", "nosuch",
                           "ddim:steps=0", "ddim:step=3", "ddim+", "tome:ratio=2", "deepcache:interval=3+dpmpp"])
models = st.sampled_from(["tiny-sd", "tiny-dit", "no-such-model", "acme/imaginary"])
out_dirs = st.sampled_from(["new", "store", "/dev/null/sub", "afile.txt", ""])
out_files = st.sampled_from(["grid.png", "sub/grid.png", "/dev/null/x.png", "grid.txt", "afile.txt", "store"])


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _recipe_ok(recipe: str) -> bool:
    return recipe in ("", "ddim", "dpmpp2m:steps=20", "dpm++", "deepcache:interval=3", "deepcache:interval=3+dpmpp")


def _out_dir_ok(name: str) -> bool:
    return name in ("new", "store")


@st.composite
def command_lines(draw) -> tuple[list[str], bool]:
    """(argv, whether every argument is valid)."""
    command = draw(st.sampled_from(["bench", "generate", "report"]))
    argv, ok = [command], True
    if command == "bench":
        same_as_stored = True  # a resume must not change the stored run's settings
        for flag, values, rule, parse, stored in (
                ("--steps", numbers, lambda v: _int(v) is not None and 1 <= _int(v) <= 1000, _int, 50),
                ("--samples", numbers, lambda v: _int(v) is not None and _int(v) >= 2, _int, 100),
                ("--timing-batch", numbers, lambda v: _int(v) is not None and _int(v) >= 1, _int, 1),
                ("--guidance", floats, lambda v: _float(v) is not None and math.isfinite(_float(v))
                 and _float(v) >= 0, _float, 4.0)):
            if draw(st.booleans()):
                value = draw(values)
                argv += [flag, value]
                ok &= rule(value)
                same_as_stored &= parse(value) == stored
        if draw(st.booleans()):
            recipe = draw(recipes)
            argv += ["--recipes", recipe]
            ok &= _recipe_ok(recipe)
            same_as_stored &= recipe == ""
        model = draw(models)
        argv += ["--model", model]
        ok &= model in ("tiny-sd", "tiny-dit")
        out = draw(out_dirs)
        argv += ["--out", out]
        ok &= _out_dir_ok(out)
        resume = draw(st.sampled_from([None, RUN_ID, "typo"]))
        if resume:
            argv += ["--resume", resume]
            ok &= out == "store" and resume == RUN_ID and same_as_stored and model == "tiny-sd"
    elif command == "generate":
        argv += ["--prompt", "a handwritten seven"]
        if draw(st.booleans()):
            value = draw(numbers)
            argv += ["--steps", value]
            ok &= _int(value) is not None and 1 <= _int(value) <= 1000
        if draw(st.booleans()):
            value = draw(numbers)
            argv += ["-n", value]
            ok &= _int(value) is not None and _int(value) >= 1
        if draw(st.booleans()):
            value = draw(floats)
            argv += ["--guidance", value]
            ok &= _float(value) is not None and math.isfinite(_float(value)) and _float(value) >= 0
        recipe = draw(recipes)
        argv += ["--recipe", recipe]
        ok &= _recipe_ok(recipe)
        model = draw(models)
        argv += ["--model", model]
        ok &= model in ("tiny-sd", "tiny-dit")
        out = draw(out_files)
        argv += ["--out", out]
        ok &= out in ("grid.png", "sub/grid.png")
    else:
        out = draw(out_dirs)
        argv += ["--out", out]
        ok &= out == "store"
        run = draw(st.sampled_from([None, RUN_ID, "typo", "nonexistent"]))
        if run:
            argv += ["--run", run]
            ok &= run == RUN_ID
    return argv, ok


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")}


STORED = {"models": ["tiny-sd"], "recipes": [""], "samples": 100, "steps": 50, "guidance": 4.0, "quick": False,
          "timing_batch": 1}


def _prepare(root: Path) -> None:
    """A file where a folder is expected, and a store holding one finished run ``RUN_ID`` of ``STORED``."""
    import json

    from effdiff.bench.store import Environment, ResultsStore, config_hash

    (root / "afile.txt").write_text("not a folder")
    with ResultsStore(root / "store" / "results.sqlite") as store:
        config = _run_config(STORED)
        with store.engine.begin() as conn:
            conn.execute(store.runs_table.insert().values(run_id=RUN_ID, config_hash=config_hash(config),
                                                          config_json=json.dumps(config),
                                                          started="2026-12-04T12:00:00", state="complete"))
        store.write(RUN_ID, "tiny-sd", "", "full", {"speedup": 1.0, "labels": []},
                    Environment("t", "d", "e", 2, "float32", "cpu", "x"))


def _run_config(stored: dict) -> dict:
    """What run_bench would register for a bare resume of ``stored`` (the hash a resume is checked against)."""
    from effdiff.bench.runner import config_dict, make_config

    config = make_config(stored["models"], stored["recipes"], stored["samples"], stored["steps"], stored["guidance"],
                         None, stored["quick"], stored["timing_batch"])
    return config_dict(config)


@pytest.fixture
def no_compute(monkeypatch):
    """Every command's compute replaced by a recorder; the resume check stays real (it reads the store)."""
    import effdiff.bench.generate
    import effdiff.bench.report
    import effdiff.bench.runner
    from effdiff.bench.store import Environment, ResultsStore

    reached: list[str] = []

    def fake_run_bench(models, recipes, *, out_dir, resume_run_id=None, on_start=None, **kwargs):
        reached.append("bench")
        if resume_run_id is not None:
            with ResultsStore(Path(out_dir) / "results.sqlite") as store:
                return store.resume_run(resume_run_id, _run_config({"models": models, "recipes": recipes, **{
                    k: kwargs[k] for k in ("samples", "steps", "guidance", "quick", "timing_batch")}}))
        with ResultsStore(Path(out_dir) / "results.sqlite") as store:  # a valid run stores a row, as the real one
            run_id = store.start_run({"fake": True})
            store.write(run_id, "m", "", "full", {"labels": []}, Environment("t", "d", "e", 2, "float32", "cpu", "x"))
        return run_id

    monkeypatch.setattr(effdiff.bench.runner, "run_bench", fake_run_bench)
    monkeypatch.setattr(effdiff.bench.report, "write_html", lambda *a, **k: reached.append("report") or "r.html")
    monkeypatch.setattr(effdiff.bench.generate, "generate", lambda *a, **k: reached.append("generate") or "g.png")
    return reached


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=command_lines())
def test_cli_never_tracebacks_never_accepts_bad_input_never_writes_first(case, no_compute, monkeypatch):
    argv, ok = case
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        _prepare(root)
        monkeypatch.chdir(root)
        before = _tree(root)
        no_compute.clear()
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse: a value of the wrong type
            code = exc.code
        assert code == (0 if ok else USAGE_ERROR), argv
        if not ok:
            assert not no_compute, f"{argv} reached {no_compute} before it was refused"
            assert _tree(root) == before, f"{argv} wrote files before it was refused"
