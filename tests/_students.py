"""What the distilled-student method tests share: a model folder of tiny students, the teacher pointing at it, a
seeded generation, a denoiser-call counter, and the round trip every shipped student must pass."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from _teacher import tiny_teacher

import effdiff
from effdiff.distill.store import RECORD
from effdiff.distill.trainer import DistillConfig, distill


def model_folder_with(folder: Path, method: str, **settings) -> Path:
    """``folder`` made a model folder holding both forms of a ``method`` student of ``tiny_teacher()``."""
    for form in ("lora", "full"):
        config = DistillConfig(model="tiny-sd", method=method, form=form, batch_size=4, warmup=1, **settings)
        out = folder / "distill" / (f"{method}-lora" if form == "lora" else method)
        distill(config, folder / "runs" / form, out, pipe=tiny_teacher())
    return folder


def teacher_at(folder: Path, seed: int = 0, kind: str = "sd"):
    """The tiny teacher (``kind`` as ``tiny_teacher``), as if ``effdiff.load`` had loaded it from ``folder``."""
    pipe = tiny_teacher(kind, seed=seed)
    name = "tiny-dit" if kind == "dit" else "tiny-sd"
    pipe.effdiff_model_name, pipe.effdiff_model_folder, pipe.effdiff_model_ref = name, str(folder), str(folder)
    return pipe


def generate(pipe, **kwargs) -> torch.Tensor:
    return pipe("a handwritten seven", output_type="pt", generator=torch.Generator().manual_seed(0), **kwargs).images


def call_batches(pipe) -> list[int]:
    """Batch sizes of the denoiser's calls from now on (a CFG step's call has both halves)."""
    batches: list[int] = []
    pipe.denoiser.register_forward_pre_hook(lambda _m, args, kwargs: batches.append(len(args[0])), with_kwargs=True)
    return batches


def timesteps_seen(pipe) -> list[tuple[int, int]]:
    """(batch size, timestep) of the denoiser's calls from now on."""
    seen: list[tuple[int, int]] = []
    pipe.denoiser.register_forward_pre_hook(lambda _m, args, kwargs: seen.append((len(args[0]), int(args[1]))),
                                            with_kwargs=True)
    return seen


def assert_shipped_student_round_trips(model: str, folder: Path, recipe: str, **call) -> torch.Tensor:
    """A shipped student is ≤ 10 % of the model, changes the samples, is removed bit for bit, and loads with
    ``effdiff.load(folder)`` to the same samples; returns them."""
    record = json.loads((folder / RECORD).read_text())
    assert record["file_fraction_of_model"] <= 0.10 and record["teacher"] == model
    pipe = effdiff.load(model)
    baseline = generate(pipe, num_inference_steps=2, guidance_scale=1.0)
    effdiff.accelerate(pipe, recipe)
    student = generate(pipe, **call)
    assert torch.isfinite(student).all() and not torch.equal(student, baseline)
    pipe.effdiff.remove()
    assert torch.equal(generate(pipe, num_inference_steps=2, guidance_scale=1.0), baseline)
    loaded = effdiff.load(str(folder))
    assert loaded.effdiff.methods[0].name == recipe.split(":")[0] and torch.equal(generate(loaded, **call), student)
    return student


def loss_ratio_after_training(trainer) -> float:
    """The objective on one fixed batch and noise draw after ``trainer.train()`` over before it."""
    fixed = trainer._batch()

    def fixed_loss() -> float:
        with torch.no_grad():
            return trainer.objective(*fixed, trainer.uncond, torch.Generator().manual_seed(5)).item()

    before = fixed_loss()
    trainer.train()
    return fixed_loss() / before
