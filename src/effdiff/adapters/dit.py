"""Diffusion-Transformer adapters: a flat list of transformer blocks (two lists for Flux)."""

from __future__ import annotations

from effdiff.adapters.base import Adapter, BlockRef


class DiTAdapter(Adapter):
    kind = "dit"
    model_class = "DiTTransformer2DModel"

    def blocks(self) -> list[BlockRef]:
        return self._list(self.model, "transformer_blocks", "transformer", "hidden")


class PixArtAdapter(DiTAdapter):
    model_class = "PixArtTransformer2DModel"


class SD3Adapter(DiTAdapter):
    model_class = "SD3Transformer2DModel"

    def blocks(self) -> list[BlockRef]:
        return self._list(self.model, "transformer_blocks", "transformer", "joint")


class FluxAdapter(DiTAdapter):
    model_class = "FluxTransformer2DModel"

    def blocks(self) -> list[BlockRef]:
        return (self._list(self.model, "transformer_blocks", "transformer", "joint")
                + self._list(self.model, "single_transformer_blocks", "single", "joint"))
