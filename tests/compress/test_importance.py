"""Diff-Pruning's informative timesteps: the ε-loss is accumulated from t = 0 upward and stops at the first
timestep whose loss falls under the threshold × the peak so far; the gradients left are the sum over the rest."""

from __future__ import annotations

import torch
from torch import nn

from effdiff.compress.importance import accumulate_taylor_gradients
from effdiff.zoo.architectures import default_scheduler


class Scale(nn.Module):
    """ε̂ = w·x_t: exact where x_t is nearly all noise (late t), wrong where it is nearly all image (early t)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, noisy, t, text):
        return self.w * noisy


def test_timesteps_stop_at_the_threshold_and_the_gradient_is_their_sum():
    alphas = default_scheduler().alphas_cumprod.float()
    images = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    model = Scale()
    used = accumulate_taylor_gradients(model, model, images, None, alphas, "epsilon", threshold=0.05, stride=50,
                                       generator=torch.Generator().manual_seed(2))
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(2))
    losses, gradient = [], torch.zeros(())
    for t in range(0, 1000, 50):
        a = alphas[t]
        noisy = a.sqrt() * images + (1 - a).sqrt() * noise
        w = torch.ones((), requires_grad=True)
        loss = (w * noisy - noise).pow(2).mean()
        if losses and loss.item() < 0.05 * max(losses):
            break
        losses.append(loss.item())
        gradient += torch.autograd.grad(loss, w)[0]
    assert used == list(range(0, 50 * len(losses), 50)) and 1 < len(used) < 20
    assert torch.allclose(model.w.grad, gradient)
