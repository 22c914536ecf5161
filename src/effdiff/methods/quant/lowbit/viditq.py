"""ViDiT-Q: per-token dynamic activations plus static smoothing and a rotation of the input channels (simulated)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from effdiff.context import StepContext
from effdiff.methods.quant.lowbit.base import QuantMethod
from effdiff.methods.quant.lowbit.fake import DynamicActivation, FakeQuantLayer, is_quantized, weight_grid
from effdiff.methods.quant.lowbit.packed import LayerQuant
from effdiff.methods.quant.lowbit.svdquant import smoothing
from effdiff.registry import Paper, Param, RecipeError

VIDITQ = Paper("ViDiT-Q: Efficient and Accurate Quantization of Diffusion Transformers for Image and Video Generation",
               "2406.02540", "ICLR 2025")


def hadamard(n: int) -> torch.Tensor:
    """Sylvester's ``n x n`` Hadamard matrix of +-1 (``n`` a power of two), float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two size, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@lru_cache(maxsize=64)
def rotation(width: int, seed: int) -> torch.Tensor:
    """The orthogonal ``width x width`` matrix rotating a layer's input channels, a function of ``(width, seed)``.

    ``diag(signs) (H_k / sqrt(k)) kron Q_m``: ``k`` is the largest power of two dividing ``width``, ``H_k`` its
    Hadamard matrix, ``Q_m`` a random orthogonal matrix of the odd rest ``m`` (QR of a seeded Gaussian, signs
    fixed; ``Q_1 = 1``) and ``signs`` seeded random +-1 — QuaRot's randomised Hadamard where ``width`` is a power
    of two, and still mixing every channel with every other where it is not (96 = 32 x 3). Regenerated, never
    stored, so a reloaded calibration rotates identically. Returned float32; callers must not modify it.
    """
    k = width & -width
    m = width // k
    generator = torch.Generator().manual_seed(seed * 1_000_003 + width)
    q = torch.ones(1, 1, dtype=torch.float64)
    if m > 1:
        q, r = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=torch.float64))
        q = (q * torch.sign(torch.diagonal(r))).contiguous()
    signs = torch.randint(0, 2, (width,), generator=generator).double() * 2 - 1
    return (signs[:, None] * torch.kron(hadamard(k) / math.sqrt(k), q)).float().contiguous()


def rotate_input(x: torch.Tensor, rot: torch.Tensor, conv: bool) -> torch.Tensor:
    """``x R`` along the channel axis (1 for conv inputs, the last for linear inputs)."""
    if not conv:
        return x @ rot.to(x.dtype)
    return (x.movedim(1, -1) @ rot.to(x.dtype)).movedim(-1, 1)


def rotate_weight(weight: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """The weight ``W'`` with ``conv/linear(x R, W') = conv/linear(x, W)``: its input axis times ``R`` (float64)."""
    return (weight.double().movedim(1, -1) @ rot.double()).movedim(-1, 1).float()


@dataclass
class RotatedInput:
    """The activation step of a ViDiT-Q layer: rotate the (already smoothed) input, then quantize it per token."""

    rot: torch.Tensor
    conv: bool
    quantize: DynamicActivation | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = rotate_input(x, self.rot, self.conv)
        return self.quantize(x) if self.quantize is not None else x


def viditq_layer(module: nn.Module, x_absmax: torch.Tensor | None, wbits: int, abits: int, alpha: float,
                 rot: torch.Tensor | None, group: int, method: str) -> LayerQuant:
    """The record of one Linear / Conv2d: weight ``W diag(s) R`` on per-output-channel grids, ``s`` stored.

    ``x_absmax`` (the input's per-channel maxima over every calibration timestep) gives the static smoothing
    ``s``; None skips it. ``rot`` None skips the rotation. Activations get symmetric per-token grids over
    ``group`` channels (0: the whole token) computed at run time. With float weights the record keeps none
    and ``rotated_layer`` multiplies the smoothing and the rotation into the float weight.
    """
    weight = module.weight.detach().float()
    inp = weight.shape[1]
    lam = None
    if x_absmax is not None:
        w_absmax = weight.abs().transpose(0, 1).reshape(inp, -1).amax(1)
        lam = smoothing(x_absmax, w_absmax, alpha)
    act: dict[str, Any] = {"abits": abits, "act_group": (group or inp) if is_quantized(abits) else 0}
    if not is_quantized(wbits):
        return LayerQuant(list(weight.shape), wbits, smooth=lam, **act)
    if lam is not None:
        weight = weight * lam.reshape(1, inp, *([1] * (weight.ndim - 2)))
    if rot is not None:
        weight = rotate_weight(weight, rot)
    grid, scale, zero = weight_grid(weight, wbits, method)
    return LayerQuant.from_codes(grid.codes(weight), scale, zero, [0, inp], wbits, False, smooth=lam, **act)


def rotated_layer(record: LayerQuant, module: nn.Module, rot: torch.Tensor | None,
                   ctx: StepContext | None = None) -> FakeQuantLayer:
    """The fake-quant forward of a ViDiT-Q record: ``Q(((x / s) R)) (W diag(s) R)^T``, ``R`` None: no rotation."""
    layer = record.layer(module, ctx)
    if rot is None:
        return layer
    if record.codes is None:  # float weights: the record holds W diag(s), the rotation is applied here
        layer.weight = rotate_weight(layer.weight, rot)
    layer.activation = RotatedInput(rot, layer.conv, layer.activation)  # type: ignore[assignment]
    return layer


class ViDiTQ(QuantMethod):
    """ViDiT-Q (Zhao et al., arXiv 2406.02540, ICLR 2025), simulated: every Linear / Conv2d gets

    1. **fine-grained dynamic activation quantization** — symmetric per-token grids (one per row of a linear
       input, one per pixel of a conv input, over all its channels or over groups of ``group``), computed
       on the fly at every call, so the ranges follow the large variation across tokens, CFG branches and
       timesteps without any timestep-specific calibration;
    2. **static-dynamic channel balancing**, in the paper's order: first a *static* SmoothQuant-style scale
       ``s = max|X|^alpha / max|W|^(1-alpha)`` per input channel (``svdquant.smoothing``), ``max|X|`` over the
       calibration samples at *every* timestep, so one timestep-invariant ``s`` per layer removes the channel
       imbalance that persists over time; then a *rotation* ``R`` of the input channels (``rotation``: the
       randomised Hadamard transform where the width is a power of two, Hadamard kron a seeded random
       orthogonal matrix otherwise), which spreads the outliers that move from channel to channel over
       timesteps evenly over all channels. The layer computes ``Q((x / s) R) (W diag(s) R)^T``, equal to
       ``x W^T`` before rounding;
    3. **weights**: per-output-channel asymmetric grids of ``W diag(s) R``, by least squared error
       (``range=mse``) or min-max.

    ``smooth=false`` / ``rotate=false`` are the paper's ablations. Where nothing is quantized (wbits and
    abits 16/32) no balancing is applied, so the pipeline is bit-identical. Everything is per layer, so the
    U-Net is handled the same way (convs through their input channels: zero padding stays zero under the
    divide and the rotation). Differences from the paper: the smoothing divide and the rotation stay explicit
    per-layer operations on the activations (a deployment folds ``s`` into the preceding norm and runs a fast
    Hadamard kernel; the factors are stored and counted, the rotation is regenerated from ``(width, seed)``
    and not stored); attention matmuls stay in float, and input / output layers too; the metric-decoupled
    mixed precision of ViDiT-Q-MP is not implemented (one bit width for every quantized layer).
    Simulated: outputs are the integer model's, speed is not.
    """

    name = "viditq"
    paper = VIDITQ
    summary = "simulated low-bit PTQ for DiTs: per-token dynamic activations, static smoothing + Hadamard rotation"
    params = {
        **QuantMethod.common,
        "alpha": Param(float, 0.5, 0.0, 1.0, help="migration strength of the static smoothing"),
        "smooth": Param(bool, True, help="static per-channel smoothing (false: rotation only)"),
        "rotate": Param(bool, True, help="rotate the input channels after smoothing (false: smoothing only)"),
        "group": Param(int, 0, 0, 65536, help="channels per dynamic activation group (0: the whole token)"),
        "range": Param(str, "mse", choices=("minmax", "mse"), help="how the weight grids cover the values"),
    }

    def calibrate(self, pipe: Any) -> dict[str, LayerQuant]:
        v = self.values
        layers, observers, order, _ = self.observe(pipe, keep_values=False, per_channel=True)
        if not self._balances():
            return {n: LayerQuant(list(layers[n].weight.shape), v["wbits"], abits=v["abits"]) for n in order}
        out = {}
        for name in order:
            module = layers[name]
            absmax = observers[name].absmax
            if absmax is None or absmax.numel() != module.weight.shape[1]:
                raise RecipeError(f"viditq: the inputs {name} saw do not match its weight's input channels")
            out[name] = viditq_layer(module, absmax if v["smooth"] else None, v["wbits"], v["abits"], v["alpha"],
                                     self._rotation(module), v["group"], v["range"])
        return out

    def make_layer(self, name: str, record: LayerQuant, module: nn.Module, ctx: StepContext) -> FakeQuantLayer:
        """The record's layer with its rotation regenerated from the layer width and the calibration seed."""
        return rotated_layer(record, module, self._rotation(module) if self._balances() else None, ctx)

    def _balances(self) -> bool:
        return is_quantized(self.values["wbits"]) or is_quantized(self.values["abits"])

    def _rotation(self, module: nn.Module) -> torch.Tensor | None:
        return rotation(module.weight.shape[1], self.values["seed"]) if self.values["rotate"] else None

    def calibration_notes(self) -> dict[str, Any]:
        return {"kept_float": self._kept_float}
