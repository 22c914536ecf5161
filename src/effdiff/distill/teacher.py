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


@torch.no_grad()
def guided_prediction(model: Denoiser, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor,
                      uncond: torch.Tensor, guidance: torch.Tensor | float) -> torch.Tensor:
    """The CFG output at scale ``guidance`` (a float, or one per sample), both halves in one batch."""
    both = model(torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps]),
                 torch.cat([uncond.expand_as(text), text]))
    unconditional, conditional = both.chunk(2)
    if isinstance(guidance, torch.Tensor):
        guidance = guidance.to(both.dtype)[:, None, None, None]
    return unconditional + guidance * (conditional - unconditional)


def ddim_step(prediction: torch.Tensor, noisy: torch.Tensor, alpha_start: torch.Tensor, alpha_end: torch.Tensor,
              prediction_type: str) -> torch.Tensor:
    """Deterministic DDIM (η = 0) from cumulative alpha ``alpha_start`` to ``alpha_end`` (per-sample tensors)."""
    clean, noise = clean_and_noise(prediction, noisy, alpha_start, prediction_type)
    return alpha_end.sqrt() * clean + (1 - alpha_end).sqrt() * noise
