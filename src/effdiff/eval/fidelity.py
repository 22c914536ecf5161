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


def psnr_per_image(images: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0,
                   cap: float = 100.0) -> torch.Tensor:
    """PSNR of each image in dB; identical images give ``cap`` instead of infinity (JSON-safe)."""
    _check(images, reference)
    mse = (images.double() - reference.double()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(data_range**2 / mse.clamp_min(1e-300))).clamp(max=cap)


def psnr(images: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0, cap: float = 100.0) -> float:
    """Mean per-image PSNR in dB."""
    return float(psnr_per_image(images, reference, data_range, cap).mean())


def ssim_per_image(images: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """SSIM of each image (torchmetrics, Gaussian window 11, σ 1.5)."""
    _check(images, reference)
    return structural_similarity_index_measure(images.double(), reference.double(), data_range=data_range,
                                               reduction="none")


def ssim(images: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean SSIM."""
    return float(ssim_per_image(images, reference, data_range).mean())


def fidelity(images: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> dict[str, float]:
    """PSNR and SSIM of ``images`` against the baseline's ``reference`` images, both in [0, data_range], with
    their standard deviation over the samples (seeds): one seed's image can drift while the rest do not."""
    p, s = psnr_per_image(images, reference, data_range), ssim_per_image(images, reference, data_range)
    spread = (lambda t: float(t.std())) if len(images) > 1 else (lambda t: 0.0)
    return {"psnr": float(p.mean()), "ssim": float(s.mean()), "psnr_std": spread(p), "ssim_std": spread(s)}
