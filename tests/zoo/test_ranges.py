"""Training settings outside their ranges are refused by flag name, before any model is loaded."""

from __future__ import annotations

import dataclasses
import re

import pytest

from effdiff.compress.trainer import CompressConfig, CompressTrainer
from effdiff.distill.trainer import DistillConfig, DistillTrainer
from effdiff.zoo.ranges import RULES, refuse_out_of_range
from effdiff.zoo.train import TrainConfig, Trainer

CONFIGS = (TrainConfig, DistillConfig, CompressConfig)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.__name__)
def test_the_defaults_are_in_range(config):
    refuse_out_of_range(config(model="tiny-sd"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.__name__)
def test_every_ruled_setting_of_every_config_is_checked(config):
    names = {f.name for f in dataclasses.fields(config)}
    numeric = {f.name for f in dataclasses.fields(config)
               if f.type in ("int", "float", "float | None") and f.name not in ("seed",)}
    assert numeric
    # macs: compress checks it in its own words; w_max: against w_min (below)
    assert numeric - {"macs", "w_max"} <= set(RULES) & names


@pytest.mark.parametrize(("field", "bad", "flag", "wanted"), [
    ("lr", -1.0, "--lr", "> 0"),
    ("lr", 0.0, "--lr", "> 0"),
    ("max_minutes", 0.0, "--max-minutes", "> 0"),
    ("batch_size", 0, "--batch-size", "≥ 1"),
    ("iterations", 0, "--iterations", "≥ 1"),
    ("guidance_weight", -0.5, "--guidance-weight", "≥ 0"),
    ("regression_weight", -0.25, "--regression-weight", "≥ 0"),
    ("ema_decay", 1.0, "--ema-decay", "in [0, 1)"),
    ("caption_dropout", 1.5, "--caption-dropout", "in [0, 1]"),
    ("reflow_share", 0.0, "--reflow-share", "in (0, 1]"),
    ("threshold", 1.0, "--threshold", "in (0, 1)"),
])
def test_a_setting_outside_its_range_is_refused_by_its_flag(field, bad, flag, wanted):
    config = next(c for c in CONFIGS if field in {f.name for f in dataclasses.fields(c)})
    with pytest.raises(ValueError, match="^" + re.escape(f"{flag} must be {wanted}, got {bad}")):
        refuse_out_of_range(config(model="tiny-sd", **{field: bad}))


def test_no_budget_passes_and_the_edges_of_each_range_pass():
    refuse_out_of_range(DistillConfig(model="tiny-sd", max_minutes=None, ema_decay=0.0, guidance=0.0,
                                      regression_weight=0.0, w_min=0.0, w_max=0.5))
    refuse_out_of_range(CompressConfig(model="tiny-sd", caption_dropout=1.0, teacher_weight=0.0,
                                       feature_weight=0.0, guidance_weight=0.0, warmup=0))


def test_an_empty_guidance_range_is_refused():
    with pytest.raises(ValueError, match="--w-max must be above --w-min, got 2.0 and 5.0"):
        refuse_out_of_range(DistillConfig(model="tiny-sd", w_min=5.0, w_max=2.0))


@pytest.mark.parametrize("make", [
    lambda tmp: Trainer(TrainConfig(model="tiny-sd", lr=-1.0), tmp),
    lambda tmp: DistillTrainer(DistillConfig(model="tiny-sd", critic_updates=0), tmp / "run", tmp / "out"),
    lambda tmp: CompressTrainer(CompressConfig(model="tiny-sd", feature_weight=-1.0), tmp / "run", tmp / "out"),
], ids=["zoo train", "distill", "compress"])
def test_each_trainer_refuses_before_it_writes_or_loads_anything(make, tmp_path):
    with pytest.raises(ValueError, match="must be"):
        make(tmp_path / "job")
    assert not (tmp_path / "job").exists()
