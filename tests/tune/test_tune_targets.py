"""Targets of ``effdiff tune``: parsed into bounds absolute or relative to the baseline, refused when malformed."""

import pytest

from effdiff.tune.targets import parse_goal


@pytest.mark.parametrize(("text", "baseline", "bound"), [
    ("psnr>=30", None, 30.0),
    ("ssim>=0.9", None, 0.9),
    ("fid<=+10%", 2.0, 2.2),
    ("fid<=-10%", 2.0, 1.8),
    ("fid<=5", 2.0, 5.0),
    ("kid<=+0.001", 0.002, 0.003),
    ("acc>=99", 1.0, 0.99),  # absolute accuracy in percent
    ("acc>=99%", 1.0, 0.99),
    ("acc>=-1", 0.95, 0.94),  # relative: percentage points below the baseline
    ("accuracy>=-5%", 0.8, 0.76),  # relative: percent of the baseline's accuracy
])
def test_goals_bound_as_written(text, baseline, bound):
    assert parse_goal(text).bound(baseline) == pytest.approx(bound)


def test_a_goal_is_met_inside_its_bound_only():
    fid = parse_goal("fid<=+10%")
    assert fid.met(2.19, 2.0) and not fid.met(2.21, 2.0)
    acc = parse_goal("acc>=-1")
    assert acc.met(0.99, 1.0) and not acc.met(0.98, 1.0)
    assert not fid.met(None, 2.0) and not fid.met(float("nan"), 2.0)  # unmeasured never counts as met
    assert fid.margin(1.0, 2.0) == pytest.approx(1.2) and acc.margin(0.95, 1.0) == pytest.approx(-0.04)


@pytest.mark.parametrize(("text", "message"), [
    ("psnr=>30", "must look like psnr>=30"),
    ("lpips<=0.1", "must look like psnr>=30"),
    ("fid>=+10%", "fid is lower for better images: write fid<="),
    ("acc<=99", "acc is higher for better images"),
    ("psnr>=+3", "already compares with the baseline's images"),
    ("fid<=10%", "needs a sign to say it is relative"),
])
def test_malformed_targets_say_what_is_accepted(text, message):
    with pytest.raises(ValueError, match=message):
        parse_goal(text)


def test_a_relative_bound_needs_the_baseline():
    with pytest.raises(ValueError, match="relative to the baseline"):
        parse_goal("fid<=+10%").bound(None)
