"""The denoisers ``effdiff plan`` knows, built from their published configs on the meta device, and one guided
call's inputs at a given image size (latent = px / 8)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from effdiff.zoo import twins


def _unet(config: dict, text: int, width: int, extra: bool = False) -> Callable[[int, int, torch.dtype], tuple]:
    def build(latent: int, batch: int, dtype: torch.dtype) -> tuple[nn.Module, dict[str, Any]]:
        from diffusers import UNet2DConditionModel

        model = UNet2DConditionModel(**config).to(dtype)
        call: dict[str, Any] = {"sample": torch.randn(batch, 4, latent, latent, dtype=dtype),
                                "timestep": torch.full((batch,), 500),
                                "encoder_hidden_states": torch.randn(batch, text, width, dtype=dtype)}
        if extra:  # SDXL's pooled text and size conditioning
            call["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 1280, dtype=dtype),
                                         "time_ids": torch.randn(batch, 6, dtype=dtype)}
        return model, call

    return build


def _pixart(latent: int, batch: int, dtype: torch.dtype) -> tuple[nn.Module, dict[str, Any]]:
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel(**twins.PIXART_XL2).to(dtype)
    return model, {"hidden_states": torch.randn(batch, 4, latent, latent, dtype=dtype),
                   "encoder_hidden_states": torch.randn(batch, 120, 4096, dtype=dtype),
                   "timestep": torch.full((batch,), 500), "added_cond_kwargs": {"resolution": None,
                                                                                  "aspect_ratio": None}}


def _flux(latent: int, batch: int, dtype: torch.dtype) -> tuple[nn.Module, dict[str, Any]]:
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(**twins.FLUX_DEV).to(dtype)
    tokens = (latent // 2) ** 2
    return model, {"hidden_states": torch.randn(batch, tokens, 64, dtype=dtype),
                   "encoder_hidden_states": torch.randn(batch, 512, 4096, dtype=dtype),
                   "pooled_projections": torch.randn(batch, 768, dtype=dtype), "timestep": torch.full((batch,), 0.5),
                   "img_ids": torch.zeros(tokens, 3), "txt_ids": torch.zeros(512, 3),
                   "guidance": torch.full((batch,), 3.5)}


# name -> (builder, guided: whether a step calls it on a CFG batch of 2)
DENOISERS: dict[str, tuple[Callable[..., tuple], bool]] = {
    "sd15-arch": (_unet(twins.SD15_UNET, 77, 768), True),
    "sdxl-arch": (_unet(twins.SDXL_UNET, 77, 2048, extra=True), True),
    "pixart-alpha-arch": (_pixart, True),
    "flux-dev-arch": (_flux, False),  # guidance-distilled: one pass a step
}


def build_on_meta(name: str, px: int, batch: int, dtype: torch.dtype) -> tuple[nn.Module, dict[str, Any]]:
    """(denoiser, call kwargs) on the meta device for images of ``px`` pixels a side."""
    if name not in DENOISERS:
        raise ValueError(f"effdiff plan knows {', '.join(DENOISERS)}; got {name!r}")
    if px % 64:
        raise ValueError(f"--px must be a multiple of 64 (an 8× VAE and the U-Nets' 8× downsampling), got {px}")
    with torch.device("meta"):
        model, call = DENOISERS[name][0](px // 8, batch, dtype)
    return model.eval(), call
