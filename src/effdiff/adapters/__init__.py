"""Adapters: one per diffusers backbone class, all giving the same structural view.

``adapter_for(pipe)`` finds the denoiser (``pipe.unet`` or ``pipe.transformer``) and wraps it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from effdiff.adapters.base import PATTERNS, STREAMS, Adapter, BlockRef, Streams
from effdiff.adapters.compiled import unwrap
from effdiff.adapters.dit import DiTAdapter, FluxAdapter, PixArtAdapter, SD3Adapter
from effdiff.adapters.unet import UNet2DAdapter, UNet2DConditionAdapter
from effdiff.errors import UnsupportedBackboneError

# Most specific first (PixArt is not a DiT subclass in diffusers, but keep the order explicit anyway).
ADAPTERS: tuple[type[Adapter], ...] = (
    UNet2DConditionAdapter, UNet2DAdapter, PixArtAdapter, DiTAdapter, SD3Adapter, FluxAdapter,
)
DENOISER_ATTRS = ("unet", "transformer")


def find_denoiser(pipe: Any) -> nn.Module:
    """The pipeline's denoiser module (the module inside a ``torch.compile`` wrapper), or an error naming what
    was looked for."""
    if isinstance(pipe, nn.Module):
        return unwrap(pipe)
    for attr in DENOISER_ATTRS:
        model = getattr(pipe, attr, None)
        if isinstance(model, nn.Module):
            return unwrap(model)
    raise UnsupportedBackboneError(
        f"{type(pipe).__name__} has no denoiser at .unet or .transformer, so effdiff cannot accelerate it"
    )


def denoiser_attr(pipe: Any) -> str:
    for attr in DENOISER_ATTRS:
        if isinstance(getattr(pipe, attr, None), nn.Module):
            return attr
    find_denoiser(pipe)  # raises the sentence
    return ""


def adapter_for(pipe_or_model: Any) -> Adapter:
    """The adapter for a pipeline's (or a bare model's) denoiser; unsupported classes are refused."""
    model = find_denoiser(pipe_or_model)
    for cls in ADAPTERS:
        if cls.matches(model):
            return cls(model)
    supported = ", ".join(c.model_class for c in ADAPTERS)
    raise UnsupportedBackboneError(f"unsupported backbone {type(model).__name__}; supported: {supported}")


__all__ = [
    "ADAPTERS", "PATTERNS", "STREAMS", "Adapter", "BlockRef", "Streams", "UnsupportedBackboneError", "adapter_for",
    "denoiser_attr", "find_denoiser",
]
