"""Fidelity of an accelerated pipeline's images to the baseline's own images (same prompts, same seeds).

This answers "how much did the speed-up change the picture", not "is the picture good": a method can
stay realistic while drifting from the baseline, which only the distribution metrics would forgive.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.image import structural_similarity_index_measure


def _check(images: torch.Tensor, reference: torch.Tensor) -> None:
    if images.shape != reference.shape:
        raise ValueError(f"images {tuple(images.shape)} and reference {tuple(reference.shape)} differ")
    if images.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) images, got shape {tuple(images.shape)}")


def psnr(images: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0, cap: float = 100.0) -> float:
    """Mean per-image PSNR in dB; identical images give ``cap`` instead of infinity (JSON-safe)."""
    _check(images, reference)
    mse = (images.double() - reference.double()).pow(2).flatten(1).mean(1)
    per_image = 10 * torch.log10(data_range**2 / mse.clamp_min(1e-300))
    return float(per_image.clamp(max=cap).mean())


def ssim(images: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean SSIM (torchmetrics, Gaussian window 11, σ 1.5)."""
    _check(images, reference)
    value = structural_similarity_index_measure(images.double(), reference.double(), data_range=data_range)
    return float(value)


def fidelity(images: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> dict[str, float]:
    """PSNR and SSIM of ``images`` against the baseline's ``reference`` images, both in [0, data_range]."""
    return {"psnr": psnr(images, reference, data_range), "ssim": ssim(images, reference, data_range)}
