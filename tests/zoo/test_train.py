"""Training: seeded runs are bit-reproducible, an interrupted run resumes to the same bits, exports load."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from _tensors import assert_same, exported_tensors

from effdiff.zoo import load
from effdiff.zoo.checkpoints import load_classifier, read_record
from effdiff.zoo.pipelines import TinySDPipeline
from effdiff.zoo.train import TrainConfig, Trainer, add_train_arguments, train, train_from_arguments


def config(model: str = "tiny-sd", **overrides) -> TrainConfig:
    """A few steps of a tiny batch: the whole code path (captions, dropout, EMA, checkpoint, export), in a second."""
    return TrainConfig(**{"model": model, "steps": 3, "batch_size": 4, "checkpoint_every": 2, **overrides})


def checkpoint(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=False)


@pytest.fixture(scope="module")
def sd_export(tmp_path_factory) -> Path:
    """One short tiny-sd run, shared by the tests that only read its results."""
    return train(config(steps=2), tmp_path_factory.mktemp("sd") / "run")


def test_seeded_generator_training_is_deterministic(sd_export, tmp_path):
    again = train(config(steps=2), tmp_path / "again")
    assert_same(exported_tensors(sd_export), exported_tensors(again))
    first, second = checkpoint(sd_export.parent), checkpoint(tmp_path / "again")
    assert_same(first["model"], second["model"])
    assert first["losses"] == second["losses"] and len(first["losses"]) == 2


def test_seeded_classifier_training_is_deterministic(tmp_path):
    a = exported_tensors(train(config("mnist-features"), tmp_path / "a"))
    b = exported_tensors(train(config("mnist-features"), tmp_path / "b"))
    c = exported_tensors(train(config("mnist-features", seed=1), tmp_path / "c"))
    assert_same(a, b)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_training_changes_the_weights_and_ema_lags(tmp_path):
    trainer = Trainer(config("mnist-features", lr=1e-2, warmup=1), tmp_path)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    after, ema = trainer.model.state_dict(), trainer.ema.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(moved) > len(before) // 2
    # the EMA sits between the start and the trained weights, not on either
    key = moved[0]
    assert not torch.equal(ema[key], after[key]) and not torch.equal(ema[key], before[key])
    assert len(trainer.losses) == 3 and all(loss > 0 for loss in trainer.losses)


class Crash(RuntimeError):
    pass


def crash_at(monkeypatch, step: int) -> None:
    """The process "dies" while computing ``step``'s batch, after the checkpoint of the step before."""
    real = Trainer.step_loss

    def dying(self):
        if self.step == step:
            raise Crash(f"simulated crash at step {step}")
        return real(self)

    monkeypatch.setattr(Trainer, "step_loss", dying)


@pytest.mark.parametrize("model", ["tiny-sd", "mnist-features", "scene-dit", "scene-judge"])
def test_interrupted_run_resumes_bit_identical(tmp_path, monkeypatch, model):
    cfg = config(model, steps=4, checkpoint_every=2)
    monkeypatch.setenv("EFFDIFF_JUDGE_HELDOUT", "50")  # scene-judge's export measures held-out accuracy
    whole = train(cfg, tmp_path / "whole")

    with monkeypatch.context() as m:
        crash_at(m, 3)
        with pytest.raises(Crash):
            train(cfg, tmp_path / "resumed")
    assert checkpoint(tmp_path / "resumed")["step"] == 2  # step 3 is lost and must be redone
    assert not (tmp_path / "resumed" / "export").exists()
    resumed = train(cfg, tmp_path / "resumed", resume=True)

    assert_same(exported_tensors(whole), exported_tensors(resumed))
    final_whole, final_resumed = checkpoint(tmp_path / "whole"), checkpoint(tmp_path / "resumed")
    for part in ("model", "ema"):
        assert_same(final_whole[part], final_resumed[part])
    assert final_whole["losses"] == final_resumed["losses"] and len(final_resumed["losses"]) == 4
    assert read_record(resumed)["steps_done"] == 4


def test_resume_without_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint.pt"):
        train(config("mnist-features"), tmp_path, resume=True)


def test_unknown_model_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="tiny-sd"):
        train(config("tiny-xl"), tmp_path)


def test_exports_load(sd_export, tmp_path):
    record = read_record(sd_export)
    assert record["name"] == "tiny-sd" and record["steps_done"] == 2
    assert record["config"]["seed"] == 0 and record["parameters"] > 1_000_000
    pipe = load(str(sd_export))
    assert isinstance(pipe, TinySDPipeline)
    images = pipe("a handwritten one", num_inference_steps=1, output_type="pt").images
    assert images.shape == (1, 1, 32, 32)

    classifier = load_classifier(train(config("mnist-features"), tmp_path / "clf"))
    assert classifier(torch.zeros(1, 1, 32, 32)).shape == (1, 10)


def test_command_line_resume(tmp_path, monkeypatch, capsys):
    """The flags of ``effdiff zoo train`` / ``python -m effdiff.zoo.train``, ``--resume`` finishing a crashed run."""
    cfg = config("mnist-features", steps=4, checkpoint_every=2)
    whole = train(cfg, tmp_path / "whole")
    with monkeypatch.context() as m:
        crash_at(m, 3)
        with pytest.raises(Crash):
            train(cfg, tmp_path / "cli")

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(["mnist-features", "--out", str(tmp_path / "cli"), "--steps", "4", "--batch-size", "4",
                              "--checkpoint-every", "2", "--resume"])
    export = train_from_arguments(args)
    printed = json.loads(capsys.readouterr().out.splitlines()[0])
    assert printed == {**asdict(cfg), "steps": 4}
    assert_same(exported_tensors(whole), exported_tensors(export))

    monkeypatch.chdir(tmp_path)  # without --out the run goes to runs/MODEL
    args = parser.parse_args(["mnist-features", "--steps", "1", "--batch-size", "2", "--seed", "3", "--lr", "0.01"])
    assert train_from_arguments(args) == Path("runs") / "mnist-features" / "export"
    assert read_record(tmp_path / "runs" / "mnist-features" / "export")["config"]["lr"] == 0.01
