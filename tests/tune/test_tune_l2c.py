"""L2C's calibration: the router retrained and the cached fraction chosen for a PSNR target."""

import json

import pytest
from conftest import make_tiny_dit

import effdiff
from effdiff.api import is_accelerated
from effdiff.methods.cache.l2c import router_file
from effdiff.tune.l2c import calibrate

STEPS = 6
pytestmark = pytest.mark.usefixtures("private_cache")


def test_calibrate_trains_reports_and_saves_a_fraction_for_the_target():
    pipe = make_tiny_dit()
    pipe.effdiff_model_name = "tiny-test"
    lines = []
    record = calibrate(pipe, ["a handwritten seven", "a handwritten two"], steps=STEPS, guidance=3.0,
                       target_psnr=25.0, log=lines.append)
    assert not is_accelerated(pipe) or not pipe.effdiff.methods
    saved = json.loads(router_file("tiny-test", STEPS).read_text())
    assert saved["fraction"] == record["fraction"] and saved["target"] == "psnr>=25"
    assert record["fraction"] == 0.0 or record["psnr"] >= 25.0
    assert lines[1].split() == ["step", "mean", "score", "min", "score", "layers", "<", "0.5"]
    assert len([line for line in lines[2:] if line.split()[0].isdigit() and len(line.split()) == 4]) == STEPS // 2
    effdiff.accelerate(pipe, f"l2c:steps={STEPS}")  # the calibrated fraction is picked up
    assert pipe.effdiff.methods[0].fraction == record["fraction"]


def test_calibrate_cli_knows_l2c(capsys):
    from effdiff.cli import main

    assert main(["calibrate", "--model", "tiny-dit", "--method", "l2c", "--target", "ssim>=0.9"]) == 2
    assert "must be psnr>=X" in capsys.readouterr().err
