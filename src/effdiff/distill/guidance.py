"""Guidance distillation: a student that gives the classifier-free-guided output in one pass, for any scale w.

Meng et al. (On Distillation of Guided Diffusion Models, arXiv 2210.03142, stage one) train a student
``x̂_η(z_t, w)`` to match the teacher's guided output ``uncond + w·(cond − uncond)`` for w drawn from a range, with
w given to the student through a Fourier embedding added to the timestep embedding. Every sampling step then
costs one denoiser call instead of two, with any solver and step count: the student is a drop-in denoiser, not a
few-step sampler. (FLUX.1-dev ships distilled this way: its ``guidance_embeds``.)

``GuidanceEmbedding`` is that w-conditioning: sinusoidal features of w, a two-layer MLP whose last layer starts at
zero (so attaching it leaves the teacher's output unchanged), added by a forward hook to the output of the module
the adapter names as the timestep embedding (``Adapter.timestep_embedding``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from effdiff.distill.teacher import Denoiser, combine_guidance, guidance_halves

FEATURES = 128
W_SCALE = 100.0  # w in 1..8 becomes 100..800 before the sinusoid: the frequencies the timestep features use
WEIGHTINGS = ("uniform", "relative")
RELATIVE_FLOOR = 1e-4  # of the mean square of (cond − uncond): keeps a sample whose halves agree from dominating


class GuidanceEmbedding(nn.Module):
    """w (one per sample) -> a vector added to the timestep embedding; zero until trained."""

    def __init__(self, embedding_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(FEATURES, embedding_dim)
        self.linear_2 = nn.Linear(embedding_dim, embedding_dim)
        nn.init.zeros_(self.linear_2.weight)
        nn.init.zeros_(self.linear_2.bias)
        self.scale: torch.Tensor | None = None  # the w of the next call(s); set by ``conditioned``

    def forward(self, scale: torch.Tensor) -> torch.Tensor:
        from diffusers.models.embeddings import get_timestep_embedding

        features = get_timestep_embedding(scale.float() * W_SCALE, FEATURES, flip_sin_to_cos=True,
                                          downscale_freq_shift=0)
        weight = self.linear_1.weight
        return self.linear_2(nn.functional.silu(self.linear_1(features.to(weight.device, weight.dtype))))

    def add_to(self, embedding: torch.Tensor) -> torch.Tensor:
        """The timestep embedding plus this w's vector (broadcast over a batch the w does not match: a
        pipeline's batch of one prompt × images)."""
        if self.scale is None:
            raise RuntimeError("GuidanceEmbedding: no guidance scale set before the denoiser call")
        extra = self(self.scale.to(embedding.device))
        if extra.shape[0] != embedding.shape[0]:
            extra = extra[:1].expand(embedding.shape[0], -1)
        return embedding + extra.to(embedding.dtype)

    def attach(self, module: nn.Module) -> torch.utils.hooks.RemovableHandle:
        """Hook ``module`` (the timestep embedding) so its output carries w; returns the handle."""
        return module.register_forward_hook(lambda _m, _args, out: self.add_to(out))


def embedding_width(module: nn.Module) -> int:
    """The width of a timestep-embedding module's output: its last linear layer's ``out_features``."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(module).__name__} has no linear layer to read its embedding width from")
    return linears[-1].out_features


@dataclass
class GuidanceObjective:
    """The loss of one batch: the student at a random w must give the teacher's guided output at that w.

    ``embedding`` is the student's ``GuidanceEmbedding`` (its ``scale`` is set per batch); timesteps are drawn
    uniformly over the training range, w uniformly over ``[w_min, w_max]``. The loss is the MSE of the raw outputs
    (guidance is linear in them, so matching outputs matches the guided x̂₀ and ε̂ as well).

    ``weighting``: ``uniform`` averages the squared error over the batch, as Meng et al.'s loss does (in
    v-parameterisation their truncated-SNR x-space weight is between ½ and 1 of this). ``relative`` divides each
    sample's error by the mean square of the teacher's guidance direction ``cond − uncond`` at that sample (weights
    normalised to mean 1 per batch): the error is then measured against the size of what guidance changes. Why:
    below t ≈ 800 that direction is 10–50× smaller than at the start of sampling, so the uniform loss barely sees
    it — the uniform tiny-sd and tiny-dit students apply an effective w of about 2 there when asked for 4
    (``benchmarks/guidance_fidelity.py``).
    """

    teacher: Denoiser
    student: Denoiser
    embedding: GuidanceEmbedding
    alphas_cumprod: torch.Tensor
    w_min: float = 1.0
    w_max: float = 8.0
    weighting: str = "uniform"

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")

    def __call__(self, images: torch.Tensor, text: torch.Tensor, uncond: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
        batch, device = len(images), images.device
        timesteps = torch.randint(0, len(self.alphas_cumprod), (batch,), generator=generator).to(device)
        scale = self.w_min + (self.w_max - self.w_min) * torch.rand(batch, generator=generator)
        noise = torch.randn(images.shape, generator=generator).to(device, images.dtype)
        alpha = self.alphas_cumprod.to(device)[timesteps][:, None, None, None]
        noisy = alpha.sqrt() * images + (1 - alpha).sqrt() * noise
        unconditional, conditional = guidance_halves(self.teacher, noisy, timesteps, text, uncond)
        target = combine_guidance(unconditional, conditional, scale.to(device))
        self.embedding.scale = scale.to(device)
        prediction = self.student(noisy, timesteps, text)
        if self.weighting == "uniform":
            return ((prediction.float() - target.float()) ** 2).mean()
        return relative_error(prediction, target, conditional - unconditional)


def relative_error(prediction: torch.Tensor, target: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """The batch's squared error with each sample weighted by 1 / the mean square of its guidance direction
    ``cond − uncond`` (weights normalised to mean 1): an error counts by the size of what guidance changes there.
    Shared by guidance distillation's ``relative`` weighting and ``effdiff compress``'s guided-output loss."""
    error = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)
    weights = 1 / (direction.float().pow(2).flatten(1).mean(1) + RELATIVE_FLOOR)
    return (weights / weights.mean() * error).mean()
