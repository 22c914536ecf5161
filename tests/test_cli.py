"""The command line: exit code 2 and one sentence for user errors, real output for real commands."""

from __future__ import annotations

import pytest

from effdiff.cli import USAGE_ERROR, main


@pytest.mark.parametrize("argv, expected", [
    (["bench", "--recipes", "nosuch"], "unknown method 'nosuch'"),
    (["bench", "--recipes", "ddim:steps=0"], "[1, 1000]"),
    (["bench", "--recipes", "ddim:step=3"], "did you mean 'steps'"),
    (["generate", "--model", "/no/such/folder", "--prompt", "x", "-n", "1"], "/no/such/folder"),
    (["generate", "--model", "acme/imaginary-model", "--prompt", "x", "-n", "1"], "HF_HUB_OFFLINE"),
])
def test_user_errors_exit_2_without_traceback(argv, expected, capsys):
    assert main(argv) == USAGE_ERROR
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_argparse_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--samples", "many"])
    assert exc.value.code == USAGE_ERROR


def test_methods_lists_registry_and_catalogue(capsys):
    assert main(["methods", "--family", "solver"]) == 0
    out = capsys.readouterr().out
    assert "dpmpp2m" in out and "Catalogue" in out and "implemented" in out


def test_report_without_runs_is_a_user_error(tmp_path, capsys):
    from effdiff.bench.store import ResultsStore

    ResultsStore(tmp_path / "results.sqlite").close()  # a store that holds no run
    assert main(["report", "--out", str(tmp_path)]) == USAGE_ERROR
    assert "no bench runs" in capsys.readouterr().err


def test_report_reads_a_store_given_by_url(tmp_path, capsys):
    """``--store URL`` reads (and the bench writes) the rows there instead of OUT/results.sqlite."""
    from effdiff.bench.store import Environment, ResultsStore

    url = f"sqlite:///{tmp_path / 'elsewhere.sqlite'}"
    with ResultsStore(url) as store:
        run_id = store.start_run({"models": ["tiny-sd"], "recipes": [""]})
        store.write(run_id, "tiny-sd", "", "full", {"speedup": 1.0, "labels": []},
                    Environment("t", "d", "e", 2, "float32", "cpu", "x"))
    assert main(["report", "--list", "--out", str(tmp_path / "empty"), "--store", url]) == 0
    assert run_id in capsys.readouterr().out
    assert main(["report", "--list", "--out", str(tmp_path)]) == USAGE_ERROR  # the folder holds no store


@pytest.mark.parametrize("argv, expected", [
    (["bench", "--steps", "0"], "--steps must be"),
    (["bench", "--steps", "-5"], "--steps must be"),
    (["bench", "--timing-batch", "0"], "--timing-batch must be"),
    (["bench", "--guidance", "nan"], "--guidance must be"),
    (["bench", "--guidance", "inf"], "--guidance must be"),
    (["bench", "--samples", "1"], "--samples must be"),
    (["bench", "--out", "/dev/null/sub"], "/dev/null exists and is not a folder"),
    (["bench", "--model", "no-such-model"], "no model called 'no-such-model'"),
    (["generate", "--prompt", "x", "--steps", "0"], "--steps must be"),
    (["generate", "--prompt", "x", "--steps", "-5"], "--steps must be"),
    (["generate", "--prompt", "x", "--guidance", "nan"], "--guidance must be"),
    (["generate", "--prompt", "x", "-n", "0"], "-n must be"),
    (["generate", "--prompt", "x", "--out", "/dev/null/x.png"], "/dev/null exists and is not a folder"),
    (["generate", "--prompt", "x", "--out", "grid.txt"], "must end in one of"),
    (["generate", "--prompt", "x", "--recipe", "dpmpp2m:steps=0"], "[1, 1000]"),
])
def test_bad_arguments_exit_2_before_any_compute(argv, expected, capsys, tmp_path, monkeypatch):
    import effdiff.bench.runner
    import effdiff.zoo

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(effdiff.zoo, "load", _no_compute)
    monkeypatch.setattr(effdiff.bench.runner, "run_bench", _no_compute)
    assert main(argv) == USAGE_ERROR
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def _no_compute(*args, **kwargs):
    raise AssertionError("compute started before the arguments were checked")


def test_dpm_aliases_resolve():
    from effdiff.registry import get_method

    assert {get_method(n).name for n in ("dpmpp", "dpm++", "DPM++2M")} == {"dpmpp2m"}
    assert get_method("dpm++sde").name == "dpmpp-sde"


def test_generate_leaves_the_step_count_to_the_recipe(monkeypatch, tmp_path):
    import effdiff.bench.generate

    seen = {}
    monkeypatch.setattr(effdiff.bench.generate, "generate", lambda *a, **k: seen.update(k) or tmp_path / "g.png")
    assert main(["generate", "--prompt", "a seven", "--recipe", "dpmpp2m:steps=20", "--out", str(tmp_path / "g.png"),
                 "-n", "1"]) == 0
    assert seen["steps"] is None
    assert main(["generate", "--prompt", "a seven", "--steps", "7", "--out", str(tmp_path / "g.png"), "-n", "1"]) == 0
    assert seen["steps"] == 7


def _store_with_runs(out):
    from effdiff.bench.store import Environment, ResultsStore

    with ResultsStore(out / "results.sqlite") as store:
        good = store.start_run({"models": ["m"], "recipes": [""]})
        store.write(good, "m", "", "full", {"speedup": 1.0, "labels": []},
                    Environment("t", "d", "e", 2, "float32", "cpu", "x"))
        store.set_state(good, "complete")
        store.start_run({"models": ["m"], "recipes": [""]})  # an empty run after it (a failed bench)
    return good


def test_report_picks_the_last_run_with_rows_and_lists_runs(tmp_path, capsys):
    good = _store_with_runs(tmp_path)
    assert main(["report", "--out", str(tmp_path)]) == 0
    assert f"report-{good}.html" in capsys.readouterr().out
    assert main(["report", "--out", str(tmp_path), "--list"]) == 0
    listing = capsys.readouterr().out
    assert good in listing and "complete" in listing and "running" in listing


def test_report_refuses_unknown_runs_and_missing_stores(tmp_path, capsys):
    good = _store_with_runs(tmp_path)
    assert main(["report", "--out", str(tmp_path), "--run", "nonexistent"]) == USAGE_ERROR
    assert "no run 'nonexistent'" in (err := capsys.readouterr().err) and good in err
    assert main(["report", "--out", str(tmp_path / "missing-folder")]) == USAGE_ERROR
    assert "no results store" in capsys.readouterr().err and not (tmp_path / "missing-folder").exists()


def test_resume_with_a_mistyped_id_is_refused_listing_runs(tmp_path, capsys):
    good = _store_with_runs(tmp_path)
    assert main(["bench", "--out", str(tmp_path), "--resume", "2026-typo"]) == USAGE_ERROR
    err = capsys.readouterr().err
    assert "no run '2026-typo'" in err and good in err


def test_bench_prints_its_run_id_at_start_and_on_ctrl_c(tmp_path, capsys, monkeypatch):
    import effdiff.bench.runner

    def interrupted(*args, on_start, **kwargs):
        on_start("20261204-000000-abcdef")
        raise KeyboardInterrupt

    monkeypatch.setattr(effdiff.bench.runner, "run_bench", interrupted)
    assert main(["bench", "--out", str(tmp_path), "--recipes", "ddim"]) == 130
    out, err = capsys.readouterr()
    assert "run 20261204-000000-abcdef" in out
    assert "--resume 20261204-000000-abcdef" in err and "RUN_ID" not in err


def test_resume_alone_takes_the_stored_settings(tmp_path, monkeypatch):
    import effdiff.bench.report
    import effdiff.bench.runner
    from effdiff.bench.runner import config_dict, make_config
    from effdiff.bench.store import ResultsStore

    stored = make_config(["tiny-dit"], ["ddim:steps=5"], samples=8, steps=7, guidance=2.0, seeds=None, quick=False,
                         timing_batch=2)
    with ResultsStore(tmp_path / "results.sqlite") as store:
        run_id = store.start_run(config_dict(stored))
    seen = {}
    monkeypatch.setattr(effdiff.bench.runner, "run_bench", lambda *a, **k: seen.update(k, args=a) or run_id)
    monkeypatch.setattr(effdiff.bench.report, "report", lambda *a, **k: "r.html")
    assert main(["bench", "--out", str(tmp_path), "--resume", run_id]) == 0
    assert seen["args"] == (["tiny-dit"], ["ddim:steps=5"])
    assert (seen["samples"], seen["steps"], seen["guidance"], seen["timing_batch"]) == (8, 7, 2.0, 2)
    assert seen["resume_run_id"] == run_id


def test_an_os_error_on_an_output_is_one_sentence_naming_the_path(monkeypatch, tmp_path, capsys):
    import errno

    import effdiff.bench.generate

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "g.png"))

    monkeypatch.setattr(effdiff.bench.generate, "generate", disk_full)
    assert main(["generate", "--prompt", "a seven", "--out", str(tmp_path / "g.png")]) == USAGE_ERROR
    err = capsys.readouterr().err
    assert f"cannot write {tmp_path / 'g.png'}: No space left on device" in err and "Traceback" not in err
