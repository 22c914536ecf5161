"""The teacher's side of every distillation objective: its classifier-free-guided prediction and a DDIM step.

Guidance is applied to the raw model output, ``uncond + w·(cond − uncond)``, exactly as the pipelines do; the
DDIM step converts any of diffusers' three parameterisations, so the same code serves a v-prediction teacher (the
bundled models) and an ε-prediction one (SD 1.5).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t, text) -> prediction


def clean_and_noise(prediction: torch.Tensor, noisy: torch.Tensor, alpha_bar: torch.Tensor,
                    prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂₀, ε̂) from a model output of any of diffusers' three parameterisations."""
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction_type == "v_prediction":
        return a * noisy - s * prediction, s * noisy + a * prediction
    if prediction_type == "epsilon":
        return (noisy - s * prediction) / a, prediction
    if prediction_type == "sample":
        return prediction, (noisy - a * prediction) / s
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected v_prediction, epsilon or sample")


def prediction_target(clean: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor,
                      prediction_type: str) -> torch.Tensor:
    """What a model of ``prediction_type`` should output at ``√ᾱ·clean + √(1 − ᾱ)·noise``: the inverse of
    ``clean_and_noise``, the target of the plain denoising loss."""
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction_type == "v_prediction":
        return a * noise - s * clean
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return clean
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected v_prediction, epsilon or sample")


@torch.no_grad()
def guidance_halves(model: Denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor,
                    uncond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(unconditional, conditional) outputs, both halves in one batch."""
    both = model(torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps]),
                 torch.cat([uncond.expand_as(text), text]))
    unconditional, conditional = both.chunk(2)
    return unconditional, conditional


def combine_guidance(unconditional: torch.Tensor, conditional: torch.Tensor,
                     guidance: torch.Tensor | float) -> torch.Tensor:
    """``uncond + w·(cond − uncond)`` at scale ``guidance`` (a float, or one per sample)."""
    if isinstance(guidance, torch.Tensor):
        guidance = guidance.to(conditional.dtype)[:, None, None, None]
    return unconditional + guidance * (conditional - unconditional)


def guided_prediction(model: Denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor,
                      uncond: torch.Tensor, guidance: torch.Tensor | float) -> torch.Tensor:
    """The CFG output at scale ``guidance`` (a float, or one per sample)."""
    return combine_guidance(*guidance_halves(model, noisy, timesteps, text, uncond), guidance)


def ddim_step(prediction: torch.Tensor, noisy: torch.Tensor, alpha_start: torch.Tensor, alpha_end: torch.Tensor,
              prediction_type: str) -> torch.Tensor:
    """Deterministic DDIM (η = 0) from cumulative alpha ``alpha_start`` to ``alpha_end`` (per-sample tensors)."""
    clean, noise = clean_and_noise(prediction, noisy, alpha_start, prediction_type)
    return alpha_end.sqrt() * clean + (1 - alpha_end).sqrt() * noise


def student_timesteps(steps: int, train_timesteps: int) -> torch.Tensor:
    """The trailing DDIM grid of ``steps`` steps: round(T − i·T/steps) − 1 (DDIMScheduler's
    ``timestep_spacing="trailing"``: the first step at T − 1, so even one step starts from pure noise)."""
    return (torch.arange(train_timesteps, 0, -train_timesteps / steps).round() - 1).long()[:steps]


def alpha_at(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, final_alpha: float) -> torch.Tensor:
    """Cumulative alpha per timestep, broadcastable over images; a negative timestep (past the last step) is DDIM's
    ``final_alpha_cumprod``."""
    table = alphas_cumprod.to(timesteps.device)
    alpha = torch.where(timesteps >= 0, table[timesteps.clamp(min=0)], torch.tensor(final_alpha))
    return alpha[:, None, None, None]


@torch.no_grad()
def ddim_sample(model: Denoiser, noise: torch.Tensor, text: torch.Tensor, steps: int, alphas_cumprod: torch.Tensor,
                final_alpha: float, prediction_type: str, uncond: torch.Tensor | None = None,
                guidance: float = 1.0) -> torch.Tensor:
    """Deterministic DDIM from pure noise in ``steps`` trailing steps (guided when ``uncond`` is given): what a
    pipeline with DDIMScheduler(timestep_spacing="trailing") computes, without the pipeline."""
    total = len(alphas_cumprod)
    sample = noise
    for t in student_timesteps(steps, total).to(noise.device):
        now = t.expand(len(noise))
        after = now - total // steps  # DDIMScheduler's previous timestep, even where the grid is uneven
        prediction = (model(sample, now, text) if uncond is None
                      else guided_prediction(model, sample, now, text, uncond.expand_as(text), guidance))
        sample = ddim_step(prediction, sample, alpha_at(alphas_cumprod, now, final_alpha),
                           alpha_at(alphas_cumprod, after, final_alpha), prediction_type)
    return sample
