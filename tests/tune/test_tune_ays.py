"""The step-schedule search as a tuning step: ``ays``' searched step counts get their schedules optimised and
cached once, so a later ``ays:steps=N`` (a tuning trial) finds them instead of searching again."""

import time

from conftest import make_tiny_sd

from effdiff.api import accelerate
from effdiff.tune.ays import calibrate
from effdiff.tune.space import Target, slots

FAST = {"ref_steps": 8, "rounds": 1, "seeds": 1, "samples": 1, "budget_s": 5.0}
UNET = Target("unet", "cpu", "UNet2DConditionModel", frozenset({"single"}))


def test_schedules_are_optimised_once_and_found_by_the_recipe(private_cache):
    pipe = make_tiny_sd()
    rows = calibrate(pipe, ["a handwritten seven"], steps=6, guidance=3.0, seed=0, counts=(3, 4), **FAST)
    assert [r["steps"] for r in rows] == [3, 4] and all(len(r["timesteps"]) == r["steps"] for r in rows)
    assert all(0 < r["psnr"] <= 100 for r in rows)
    start = time.perf_counter()
    accelerate(pipe, "ays:steps=4,ref_steps=8,rounds=1,seeds=1,samples=1,budget_s=5")
    assert time.perf_counter() - start < 2.0  # a cache hit, not another optimisation
    assert pipe.effdiff.methods[0].record["timesteps"] == rows[1]["timesteps"]


def test_ays_and_l2c_join_the_search_only_after_their_tuner():
    assert not {"ays", "l2c"} & set(sum(slots(UNET).values(), []))
    calibrated = slots(UNET, include=("ays", "l2c"))
    assert "ays" in calibrated["step schedule"] and "l2c" in calibrated["layer outputs"]
