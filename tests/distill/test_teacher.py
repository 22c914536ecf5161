"""The teacher's side of the objectives: the three parameterisations (and their denoising targets), guided
prediction, a DDIM step, and a whole trailing DDIM trajectory that matches diffusers' scheduler bit for bit."""

from __future__ import annotations

import pytest
import torch

from effdiff.distill.teacher import clean_and_noise, ddim_sample, ddim_step, guided_prediction, prediction_target


@pytest.mark.parametrize("kind", ["v_prediction", "epsilon", "sample"])
def test_each_parameterisation_recovers_the_clean_sample_and_noise(kind):
    gen = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(2, 1, 4, 4, generator=gen), torch.randn(2, 1, 4, 4, generator=gen)
    alpha = torch.tensor([0.3, 0.8])[:, None, None, None]
    noisy = alpha.sqrt() * clean + (1 - alpha).sqrt() * noise
    output = {"v_prediction": alpha.sqrt() * noise - (1 - alpha).sqrt() * clean, "epsilon": noise, "sample": clean}
    got_clean, got_noise = clean_and_noise(output[kind], noisy, alpha, kind)
    assert torch.allclose(got_clean, clean, atol=1e-5) and torch.allclose(got_noise, noise, atol=1e-5)
    assert torch.equal(prediction_target(clean, noise, alpha, kind), output[kind])  # the denoising loss's target


def test_guidance_is_applied_to_the_output_per_sample():
    def model(noisy, t, text):
        return noisy + text[:, :1, :1, None]  # uncond text 0, cond text 1

    noisy, text, uncond = torch.zeros(3, 1, 2, 2), torch.ones(3, 2, 4), torch.zeros(1, 2, 4)
    scales = torch.tensor([0.0, 1.0, 4.0])
    out = guided_prediction(model, noisy, torch.zeros(3, dtype=torch.long), text, uncond, scales)
    assert out[:, 0, 0, 0].tolist() == [0.0, 1.0, 4.0]
    assert torch.equal(guided_prediction(model, noisy, torch.zeros(3), text, uncond, 2.0), torch.full_like(noisy, 2))


def test_a_ddim_step_to_the_same_level_is_the_identity_and_to_alpha_one_gives_the_clean_sample():
    gen = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(2, 1, 4, 4, generator=gen), torch.randn(2, 1, 4, 4, generator=gen)
    alpha = torch.tensor([0.2, 0.7])[:, None, None, None]
    noisy = alpha.sqrt() * clean + (1 - alpha).sqrt() * noise
    v = alpha.sqrt() * noise - (1 - alpha).sqrt() * clean
    assert torch.allclose(ddim_step(v, noisy, alpha, alpha, "v_prediction"), noisy, atol=1e-6)
    assert torch.allclose(ddim_step(v, noisy, alpha, torch.ones_like(alpha), "v_prediction"), clean, atol=1e-5)
    with pytest.raises(ValueError, match="unknown prediction_type"):
        ddim_step(v, noisy, alpha, alpha, "velocity")


@pytest.mark.parametrize("steps", [1, 3, 12])
@pytest.mark.parametrize("guided", [False, True])
def test_ddim_sample_is_the_trailing_ddim_scheduler_bit_for_bit(steps, guided):
    """12 steps do not divide 1,000: the scheduler's step goes to t − 83 while the next call is at the grid's
    t − 84, and ddim_sample must do the same."""
    from diffusers import DDIMScheduler

    from effdiff.zoo.architectures import default_scheduler

    scheduler = DDIMScheduler.from_config(default_scheduler().config, timestep_spacing="trailing")
    gen = torch.Generator().manual_seed(0)
    weight, noise = torch.randn(1, 1, 4, 4, generator=gen), torch.randn(3, 1, 4, 4, generator=gen)
    text, uncond = torch.ones(3, 2), torch.zeros(1, 2)

    def model(x, t, text):
        return torch.tanh(x * weight) * text[:, :1, None, None] + t[:, None, None, None] / 1000

    scheduler.set_timesteps(steps)
    sample = noise.clone()
    for t in scheduler.timesteps:
        batch = t.expand(3)
        output = guided_prediction(model, sample, batch, text, uncond, 2.5) if guided else model(sample, batch, text)
        sample = scheduler.step(output, t, sample).prev_sample
    ours = ddim_sample(model, noise, text, steps, scheduler.alphas_cumprod.float(),
                       float(scheduler.final_alpha_cumprod), scheduler.config.prediction_type,
                       uncond if guided else None, 2.5)
    assert torch.equal(ours, sample)
