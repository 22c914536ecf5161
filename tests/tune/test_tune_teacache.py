"""TeaCache's calibration (a tuner, above the method) and the CLI that runs any method's tuner."""

import pytest
from conftest import make_tiny

from effdiff.adapters import find_denoiser
from effdiff.api import is_accelerated
from effdiff.methods.solvers.schedule import model_fingerprint
from effdiff.tune.teacache import calibrate

STEPS = 6
KINDS = ("unet", "dit")


@pytest.mark.parametrize("kind", KINDS)
def test_calibrate_fits_picks_and_is_reused(kind):
    pipe = make_tiny(kind)
    lines = []
    record = calibrate(pipe, ["a handwritten seven", "a handwritten two"], steps=STEPS, guidance=3.0,
                       target_psnr=20.0, thresholds=[0.05, 0.5, 5.0], log=lines.append)
    assert not is_accelerated(pipe) or not pipe.effdiff.methods  # the pipeline is left as it was
    assert len(record["coefficients"]) == record["degree"] + 1 and record["target"] == "psnr>=20"
    assert record["fingerprint"] == model_fingerprint(find_denoiser(pipe))
    assert record["threshold"] in (0.0, 0.05, 0.5, 5.0)
    assert lines[0].split() == ["step", "rel.", "input", "change", "rel.", "output", "change"]
    assert len([line for line in lines if line.split()[0].isdigit()]) == STEPS - 1  # steps 1..5 have a change
    assert record["threshold"] == 0.0 or record["psnr"] >= 20.0


@pytest.mark.parametrize(("target", "message"), [
    ("psnr=>30", "must look like psnr>=30"),
    ("psnr<=30", "psnr is higher for better images"),
    ("fid<=5", "FID, KID and accuracy targets are for effdiff tune"),
    ("ssim>=0.9", "must be psnr>=X"),
])
def test_calibrate_cli_refuses_bad_targets(target, message, capsys):
    from effdiff.cli import main

    assert main(["calibrate", "--model", "tiny-dit", "--method", "teacache", "--target", target]) == 2
    err = capsys.readouterr().err
    assert "effdiff calibrate: error:" in err and message in err


def test_calibrate_cli_refuses_a_method_without_a_tuner(capsys):
    from effdiff.cli import main

    assert main(["calibrate", "--model", "tiny-dit", "--method", "deepcache"]) == 2
    assert "deepcache has nothing to calibrate; methods with a tuner: ays, l2c, teacache" in capsys.readouterr().err


def test_the_fit_never_turns_down_inside_the_observed_changes():
    import numpy as np

    from effdiff.tune.teacache import monotone_fit

    x = np.array([0.02, 0.022, 0.024, 0.03, 0.05, 0.08, 0.2])
    y = np.array([0.03, 0.02, 0.04, 0.03, 0.08, 0.14, 0.42])  # noisy: degree 4 through it wiggles
    wiggly = np.polyval(np.polyfit(x, y, 4), np.linspace(x.min(), x.max(), 256))
    assert np.any(np.diff(wiggly) < 0)
    degree, coefficients = monotone_fit(x, y, 4)
    values = np.polyval(coefficients[::-1], np.linspace(x.min(), x.max(), 256))
    assert degree < 4 and np.all(np.diff(values) >= 0) and values[0] >= -1e-6
