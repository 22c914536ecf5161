"""U-Net adapters: down blocks, mid block, up blocks, with the long skips between them."""

from __future__ import annotations

from effdiff.adapters.base import Adapter, BlockRef


class _UNetAdapter(Adapter):
    kind = "unet"

    def blocks(self) -> list[BlockRef]:
        out = self._list(self.model, "down_blocks", "down", "unet_down")
        if getattr(self.model, "mid_block", None) is not None:
            mid = self.model.mid_block
            out.append(BlockRef("mid_block", mid, self.model, "mid_block", "mid", "unet_mid"))
        return out + self._list(self.model, "up_blocks", "up", "unet_up")

    def skips(self) -> list[tuple[int, int]]:
        """Down block i feeds the up block at the same resolution (the mirror index)."""
        blocks = self.blocks()
        downs = [i for i, b in enumerate(blocks) if b.role == "down"]
        ups = [i for i, b in enumerate(blocks) if b.role == "up"]
        return list(zip(downs, reversed(ups), strict=False))


class UNet2DConditionAdapter(_UNetAdapter):
    model_class = "UNet2DConditionModel"


class UNet2DAdapter(_UNetAdapter):
    model_class = "UNet2DModel"
