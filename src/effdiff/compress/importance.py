"""Which weights matter: Diff-Pruning's Taylor importance, gathered over the informative timesteps.

Fang et al. (Structural Pruning for Diffusion Models, arXiv 2305.10924): the first-order Taylor score of a
channel, |w·∂L/∂w| summed over its weights, where L is the noise-prediction loss accumulated over timesteps from
t = 0 upward, stopping at the first timestep whose loss falls below ``threshold`` × the largest seen so far: the
late, noisy steps carry little about the content, and their gradients would drown the early steps' (the
authors' rule, default 0.05, one batch and one noise draw for every timestep). We visit every ``stride``-th
timestep instead of all 1,000 (100 backward passes instead of 1,000 on a CPU), and read the loss through the
model's ε̂ whatever it predicts, so a v-prediction model gets the paper's curve.
"""

from __future__ import annotations

import torch
from torch import nn

from effdiff.distill.teacher import Denoiser, alpha_at, clean_and_noise


def accumulate_taylor_gradients(model: nn.Module, call: Denoiser, images: torch.Tensor, text: torch.Tensor,
                                alphas_cumprod: torch.Tensor, prediction_type: str, threshold: float = 0.05,
                                stride: int = 10, generator: torch.Generator | None = None) -> list[int]:
    """Leave in every parameter's ``.grad`` the gradient of the ε-loss summed over the informative timesteps
    (``call`` runs ``model``); returns those timesteps."""
    model.requires_grad_(True).zero_grad(set_to_none=True)
    noise = torch.randn(images.shape, generator=generator).to(images.device, images.dtype)
    peak, used = 0.0, []
    for step in range(0, len(alphas_cumprod), stride):
        timesteps = torch.full((len(images),), step, device=images.device)
        alpha = alpha_at(alphas_cumprod, timesteps, 1.0)
        noisy = alpha.sqrt() * images + (1 - alpha).sqrt() * noise
        _, noise_hat = clean_and_noise(call(noisy, timesteps, text), noisy, alpha, prediction_type)
        loss = (noise_hat.float() - noise.float()).pow(2).mean()
        if used and loss.item() < threshold * peak:
            break
        peak = max(peak, loss.item())
        loss.backward()
        used.append(step)
    return used
