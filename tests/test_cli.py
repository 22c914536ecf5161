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
    assert main(["report", "--out", str(tmp_path)]) == USAGE_ERROR
    assert "no bench runs" in capsys.readouterr().err
