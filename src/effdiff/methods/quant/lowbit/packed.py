"""What a calibrated low-bit model *is*: packed integer codes and their grids, saved and counted in bytes.

One ``LayerQuant`` per quantized layer holds exactly what a deployment would ship (codes packed two per
byte at 4 bits, per-channel scales and zero points, the activation grid, SVDQuant's smoothing factors and
bf16 low-rank branch). The live fake-quant layers are built *from* these records, so a saved and reloaded
calibration gives bit-identical outputs, and the model size is the byte count of the records plus the
float32 parameters left unquantized.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from effdiff.methods.quant import packing, saved
from effdiff.methods.quant.lowbit.fake import (
    DynamicActivation,
    FakeQuantLayer,
    Grid,
    StaticActivation,
    TemporalActivation,
    TimeGridNet,
    TimestepActivation,
    expand_segments,
    grid_from_range,
    is_quantized,
    levels,
)

if TYPE_CHECKING:
    from effdiff.context import StepContext

pack = packing.pack


def unpack(packed: torch.Tensor, bits: int, qmin: int, numel: int) -> torch.Tensor:
    """The shared packer's codes as floats (the dtype the grids compute in)."""
    return packing.unpack(packed, bits, qmin, numel).float()


@dataclass
class LayerQuant:
    """The stored form of one quantized Linear / Conv2d."""

    shape: list[int]
    wbits: int
    symmetric: bool = False
    codes: torch.Tensor | None = None  # packed uint8 (None: weight kept in float)
    scale: torch.Tensor | None = None  # (out, n_segments)
    zero: torch.Tensor | None = None  # (out, n_segments), integer values
    segments: list[int] = field(default_factory=list)
    abits: int = 32
    act_scale: torch.Tensor | None = None  # (n_act_segments,)
    act_zero: torch.Tensor | None = None
    act_segments: list[int] = field(default_factory=list)
    act_group: int = 0  # > 0: dynamic per-token groups of this many channels, symmetric
    act_gen: torch.Tensor | None = None  # (n_act_segments, P): TDQ's timestep -> grid generator (TimeGridNet rows)
    act_times: torch.Tensor | None = None  # (T,) float64: TFMQ's calibrated timesteps; act_scale / act_zero: (T, n_seg)
    smooth: torch.Tensor | None = None  # (in,) divides the input, multiplied into the weight
    down: torch.Tensor | None = None  # bf16 low-rank branch: x -> down -> up
    up: torch.Tensor | None = None

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, segments: list[int],
                   bits: int, symmetric: bool, **extra: Any) -> LayerQuant:
        qmin, _ = levels(bits, symmetric)
        return cls(list(codes.shape), bits, symmetric, pack(codes, bits, qmin), scale.float(),
                   zero.to(torch.int16), list(segments), **extra)

    def weight(self, original: torch.Tensor) -> torch.Tensor:
        """The dequantized weight the fake-quant layer multiplies with (``original``, times ``smooth`` if any,
        when not quantized)."""
        if self.codes is None or self.scale is None or self.zero is None:
            if self.smooth is None:
                return original.detach()
            return original.detach() * self.smooth.reshape(1, -1, *([1] * (original.ndim - 2)))
        qmin, qmax = levels(self.wbits, self.symmetric)
        numel = 1
        for n in self.shape:
            numel *= n
        codes = unpack(self.codes, self.wbits, qmin, numel).reshape(self.shape)
        ndim = len(self.shape)
        grid = Grid(expand_segments(self.scale, self.segments, ndim),
                    expand_segments(self.zero.float(), self.segments, ndim), qmin, qmax)
        return grid.dequantize(codes)

    def activation(self, conv: bool, clock: StepContext | None = None) -> (StaticActivation | DynamicActivation |
                                                                            TimestepActivation | TemporalActivation |
                                                                            None):
        """The input quantizer; a timestep-dependent one reads the current timestep from ``clock``."""
        if not is_quantized(self.abits):
            return None
        if self.act_group:
            return DynamicActivation(self.abits, self.act_group, conv)
        if self.act_gen is not None:
            if clock is None:
                raise ValueError("a timestep-dependent activation grid needs the step context")
            return TimestepActivation(TimeGridNet.from_flat(self.act_gen.float()), self.abits, self.act_segments, conv,
                                      clock)
        if self.act_scale is None or self.act_zero is None:
            raise ValueError("a static activation grid needs its scale and zero point")
        qmin, qmax = levels(self.abits, False)
        if self.act_times is not None:
            return self._timestep_table(conv, clock, qmin, qmax)
        return StaticActivation(Grid(self.act_scale, self.act_zero.float(), qmin, qmax), self.act_segments, conv)

    def _timestep_table(self, conv: bool, clock: StepContext | None, qmin: int, qmax: int) -> TemporalActivation:
        """One static grid per calibrated timestep, looked up by the nearest one; without a timestep (outside a
        pipeline call) the grid covering every row's range."""
        if clock is None:
            raise ValueError("a per-timestep activation grid needs the step context")
        assert self.act_scale is not None and self.act_zero is not None and self.act_times is not None
        zero = self.act_zero.float()
        grids = [StaticActivation(Grid(s, z, qmin, qmax), self.act_segments, conv)
                 for s, z in zip(self.act_scale, zero, strict=True)]
        lo, hi = ((qmin - zero) * self.act_scale).amin(0), ((qmax - zero) * self.act_scale).amax(0)
        cover = StaticActivation(grid_from_range(lo, hi, self.abits, symmetric=False), self.act_segments, conv)
        return TemporalActivation(clock, self.act_times.tolist(), grids, cover)

    def layer(self, module: nn.Module, clock: StepContext | None = None) -> FakeQuantLayer:
        low_rank = (self.down.float(), self.up.float()) if self.down is not None and self.up is not None else None
        return FakeQuantLayer(module, self.weight(module.weight),
                              self.activation(isinstance(module, nn.Conv2d), clock), self.smooth, low_rank)

    # --- storage -------------------------------------------------------------------------------------
    _TENSORS = ("codes", "scale", "zero", "act_scale", "act_zero", "smooth", "down", "up", "act_gen", "act_times")

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).contiguous() for k in self._TENSORS if getattr(self, k) is not None}

    def meta(self) -> dict[str, Any]:
        return {"shape": self.shape, "wbits": self.wbits, "symmetric": self.symmetric, "segments": self.segments,
                "abits": self.abits, "act_segments": self.act_segments, "act_group": self.act_group}

    def nbytes(self) -> int:
        """Bytes of everything stored for this layer (its bias stays a float32 model parameter)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def save(path: str | Path, layers: dict[str, LayerQuant], info: dict[str, Any]) -> int:
    """Write a calibration in the quantization packages' one format; ``info`` (method, settings, fingerprint)
    goes in the header. Returns the file size in bytes."""
    tensors = {f"{name}/{key}": t for name, lq in layers.items() for key, t in lq.tensors().items()}
    header = {"method": info["method"], "info": info, "layers": {name: lq.meta() for name, lq in layers.items()}}
    return saved.write(path, tensors, header)


def load(path: str | Path, method: str) -> tuple[dict[str, LayerQuant], dict[str, Any]]:
    """Read what ``save`` wrote for ``method``; any other file is a RecipeError saying why."""
    tensors, header = saved.read(path, method)
    layers = {}
    for name, fields in header["layers"].items():
        stored = {key: tensors[f"{name}/{key}"] for key in LayerQuant._TENSORS if f"{name}/{key}" in tensors}
        layers[name] = LayerQuant(**fields, **stored)
    return layers, header["info"]


def model_bytes(model: nn.Module, layers: dict[str, LayerQuant]) -> dict[str, int]:
    """Bytes of the quantized model as stored: records + float32 params not replaced by a record."""
    modules = dict(model.named_modules())
    replaced = sum(modules[name].weight.numel() for name, lq in layers.items() if lq.codes is not None)
    params = sum(p.numel() for p in model.parameters())
    stored = sum(lq.nbytes() for lq in layers.values())
    return {"fp32_bytes": 4 * params, "bytes": stored + 4 * (params - replaced), "records_bytes": stored}
