"""FORA: reuse every attention and MLP output of the transformer blocks for N-1 of every N steps."""

from __future__ import annotations

from typing import Any

from effdiff.context import StepContext
from effdiff.methods.cache.base import FORA
from effdiff.methods.cache.layers import LayerCache
from effdiff.registry import Param


class Fora(LayerCache):
    """Static caching of the attention and feed-forward layers inside the transformer blocks.

    Paper: Selvaraju et al., "FORA: Fast-Forward Caching in Diffusion Transformer Acceleration"
    (arXiv 2407.01425, 2024). Every ``interval``-th step runs fully and keeps the output of each
    attention (self and cross) and feed-forward layer; the steps in between reuse them, so a block only
    runs its modulation and residual additions (the LayerNorms that feed only a reused layer are skipped
    too). It needs no residual structure of the backbone, so it runs on a U-Net's transformer blocks as
    well as on a DiT's; on FLUX's single blocks the reused output is the projection of attention and MLP
    together. ``interval=1``: bit-identical.
    """

    name = "fora"
    examples = {"noop": "fora:interval=1", "skips": "fora:interval=2"}
    paper = FORA
    summary = "reuse attention and MLP outputs every N steps (DiT blocks and U-Net transformer blocks)"
    params = {
        "interval": Param(int, 3, 1, 1000, help="a full computation every `interval` steps",
                          search=(2, 6)),
        "warmup": Param(int, 0, 0, 10000, help="first steps always computed", search=(0, 4)),
    }

    def due(self, ctx: StepContext) -> bool:
        step = ctx.step_index
        return step < self.values["warmup"] or step % self.values["interval"] == 0

    def store(self, entry: dict[str, Any], out: Any, ctx: StepContext) -> None:
        entry["out"] = out

    def serve(self, entry: dict[str, Any], ctx: StepContext) -> Any:
        return entry["out"]
