"""Fake-quant primitives for the simulated low-bit methods: grids, range estimators, packed storage, layers.

Simulated means: weights are rounded to a ``bits``-wide integer grid and immediately dequantized, activations
are rounded on the fly, and the arithmetic stays in floating point. Outputs are what a real integer kernel
would compute (up to accumulation order); speed is not, so every number from these layers is labelled
``simulated``. What *is* real is the storage: ``pack`` writes the integer codes two per byte at 4 bits, so
model sizes are counted from bytes that could be shipped.

Conventions: a weight is viewed as ``(out, in, *kernel)``; its grid has one scale and zero point per output
channel and input *segment* (the whole input by default; the two halves of a U-Net skip concat for
Q-Diffusion's split quantization; groups of input channels for SVDQuant). Activations are quantized along
their channel axis (1 for conv inputs ``NCHW``, the last for linear inputs) with one grid per segment.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from effdiff.registry import RecipeError

if TYPE_CHECKING:
    from effdiff.context import StepContext

FLOAT_BITS = (16, 32)  # "not quantized": the layer keeps its floating-point weights / inputs
BITS = (2, 3, 4, 5, 6, 7, 8, *FLOAT_BITS)
RANGES = ("minmax", "percentile", "mse")
VALUES_PER_CALL = 4096  # activation values an observer keeps per call for percentile / MSE ranges
MSE_GRID = 40  # shrink factors tried by the MSE range search
TIME_GRIDS_KEPT = 1024  # timestep grids a TimestepActivation keeps before starting afresh


def check_bits(method: str, wbits: int, abits: int) -> None:
    """Refuse widths no integer grid here supports (the Param choices already do; this guards direct use)."""
    for what, bits in (("wbits", wbits), ("abits", abits)):
        if bits not in BITS:
            raise RecipeError(f"{method}: {what} must be 2 to 8 (quantized) or 16/32 (kept in float), got {bits}")


def is_quantized(bits: int) -> bool:
    return bits not in FLOAT_BITS


def levels(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer code range: ``[-(2^(b-1)-1), 2^(b-1)-1]`` symmetric (zero point 0), ``[0, 2^b-1]`` otherwise."""
    if symmetric:
        top = 2 ** (bits - 1) - 1
        return -top, top
    return 0, 2**bits - 1


@dataclass
class Grid:
    """A uniform grid: ``codes = clamp(round(x / scale) + zero)``, ``x ≈ (codes - zero) * scale``.

    ``scale`` and ``zero`` broadcast against the tensors they quantize.
    """

    scale: torch.Tensor
    zero: torch.Tensor
    qmin: int
    qmax: int

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(x / self.scale) + self.zero, self.qmin, self.qmax)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes - self.zero) * self.scale

    def fake(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequantize(self.codes(x))


def grid_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> Grid:
    """The grid covering ``[lo, hi]`` (widened to include 0, so zero is exactly representable)."""
    lo = torch.as_tensor(lo, dtype=torch.float32).clamp(max=0)
    hi = torch.as_tensor(hi, dtype=torch.float32).clamp(min=0)
    qmin, qmax = levels(bits, symmetric)
    if symmetric:
        scale = (torch.maximum(-lo, hi) / qmax).clamp(min=1e-12)
        zero = torch.zeros_like(scale)
    else:
        scale = ((hi - lo) / (qmax - qmin)).clamp(min=1e-12)
        zero = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return Grid(scale, zero, qmin, qmax)


# ---------------------------------------------------------------- ranges


def _shrunk_mse(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int,
                symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``values`` (rows x samples), the shrink of ``[lo, hi]`` with the least squared error."""
    best_err = torch.full(lo.shape, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for i in range(MSE_GRID):
        factor = 1.0 - 0.8 * i / MSE_GRID
        grid = grid_from_range(lo[:, None] * factor, hi[:, None] * factor, bits, symmetric)
        err = (grid.fake(values) - values).pow(2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo * factor, best_lo)
        best_hi = torch.where(better, hi * factor, best_hi)
    return best_lo, best_hi


def value_range(values: torch.Tensor, method: str, bits: int, symmetric: bool,
                percentile: float = 99.99) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` per row of a 2-D ``values``: min-max, the ``percentile`` (and 100 - it), or least MSE."""
    values = values.float()
    lo, hi = values.min(-1).values, values.max(-1).values
    if method == "minmax":
        return lo, hi
    if method == "percentile":
        q = torch.tensor([1 - percentile / 100, percentile / 100])
        both = torch.quantile(values, q, dim=-1)
        return both[0], both[1]
    if method == "mse":
        return _shrunk_mse(values, lo, hi, bits, symmetric)
    raise ValueError(f"unknown range method {method!r}; one of {', '.join(RANGES)}")


def segment_sizes(segments: Sequence[int]) -> list[int]:
    return [b - a for a, b in zip(segments[:-1], segments[1:], strict=True)]


def expand_segments(per_segment: torch.Tensor, segments: Sequence[int], ndim: int) -> torch.Tensor:
    """``(out, n_segments)`` -> ``(out, in, 1, ...)`` broadcastable against a weight of ``ndim`` dims."""
    sizes = torch.tensor(segment_sizes(segments))
    full = per_segment.repeat_interleave(sizes, dim=1)
    return full.reshape(*full.shape, *([1] * (ndim - 2)))


def weight_grid(weight: torch.Tensor, bits: int, method: str = "minmax", symmetric: bool = False,
                segments: Sequence[int] | None = None, percentile: float = 99.99) -> tuple[Grid, torch.Tensor,
                                                                                          torch.Tensor]:
    """Per output channel (and input segment) grid of a weight; also returns the compact scale and zero.

    The compact ``(out, n_segments)`` tensors are what is stored; the grid holds them expanded.
    """
    out, inp = weight.shape[:2]
    segments = list(segments) if segments is not None else [0, inp]
    w = weight.detach().float().reshape(out, inp, -1)
    los, his = [], []
    for a, b in zip(segments[:-1], segments[1:], strict=True):
        lo, hi = value_range(w[:, a:b].reshape(out, -1), method, bits, symmetric, percentile)
        los.append(lo)
        his.append(hi)
    compact = grid_from_range(torch.stack(los, 1), torch.stack(his, 1), bits, symmetric)
    grid = Grid(expand_segments(compact.scale, segments, weight.ndim),
                expand_segments(compact.zero, segments, weight.ndim), compact.qmin, compact.qmax)
    return grid, compact.scale, compact.zero


# ---------------------------------------------------------------- activations


def channel_axis(x: torch.Tensor, conv: bool) -> int:
    return 1 if conv else x.ndim - 1


def to_rows(x: torch.Tensor, axis: int) -> torch.Tensor:
    """``(channels, everything else)``."""
    return x.detach().float().movedim(axis, 0).reshape(x.shape[axis], -1)


class Observer:
    """Running activation statistics of one layer input, per segment of its channel axis.

    Keeps the exact min and max and, for percentile / MSE ranges, an evenly strided sample of at most
    ``VALUES_PER_CALL`` values per call (deterministic: no random draw).
    """

    def __init__(self, conv: bool, segments: Sequence[int] | None = None, keep_values: bool = False,
                 per_channel: bool = False) -> None:
        self.conv, self.segments = conv, list(segments) if segments else None
        self.keep_values, self.per_channel = keep_values, per_channel
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.absmax: torch.Tensor | None = None
        self.values: list[list[torch.Tensor]] = []
        self.call_extremes: list[tuple[torch.Tensor, torch.Tensor]] = []  # per call: (lo, hi) per segment
        self.calls = 0
        self.channels = 0

    def update(self, x: torch.Tensor) -> None:
        rows = to_rows(x, channel_axis(x, self.conv))
        self.channels = rows.shape[0]
        segments = self.segments or [0, rows.shape[0]]
        parts = [rows[a:b].reshape(-1) for a, b in zip(segments[:-1], segments[1:], strict=True)]
        lo = torch.stack([p.min() for p in parts])
        hi = torch.stack([p.max() for p in parts])
        self.call_extremes.append((lo, hi))
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        if self.per_channel:
            amax = rows.abs().amax(1)
            self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        if self.keep_values:
            kept = [p[:: max(1, p.numel() // VALUES_PER_CALL)][:VALUES_PER_CALL] for p in parts]
            self.values.append(kept)
        self.calls += 1

    def range(self, bits: int, method: str, percentile: float = 99.99,
              calls: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)`` per segment over every call seen, or over the ``calls`` listed (e.g. one timestep's)."""
        if self.lo is None or self.hi is None:
            raise RuntimeError("observer saw no data")
        if calls is None:
            lo, hi, kept = self.lo, self.hi, self.values
        else:
            lo = torch.stack([self.call_extremes[i][0] for i in calls]).amin(0)
            hi = torch.stack([self.call_extremes[i][1] for i in calls]).amax(0)
            kept = [self.values[i] for i in calls] if self.values else []
        if method == "minmax":
            return lo, hi
        los, his = [], []
        for s in range(len(lo)):
            values = torch.cat([call[s] for call in kept])[None]
            if method == "percentile":
                seg_lo, seg_hi = value_range(values, method, bits, False, percentile)
            else:  # MSE over the kept values, starting from the exact extremes
                seg_lo, seg_hi = _shrunk_mse(values, lo[s:s + 1], hi[s:s + 1], bits, False)
            los.append(seg_lo[0])
            his.append(seg_hi[0])
        return torch.stack(los), torch.stack(his)

    def grid(self, bits: int, method: str, percentile: float = 99.99) -> Grid:
        """Static per-segment asymmetric grid; scale/zero shaped ``(n_segments,)``."""
        lo, hi = self.range(bits, method, percentile)
        return grid_from_range(lo, hi, bits, symmetric=False)


@dataclass
class StaticActivation:
    """Per-tensor (per segment) activation grid fixed by calibration."""

    grid: Grid
    segments: list[int]
    conv: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        axis = channel_axis(x, self.conv)
        shape = [1] * x.ndim
        shape[axis] = x.shape[axis]
        sizes = torch.tensor(segment_sizes(self.segments))
        scale = self.grid.scale.repeat_interleave(sizes).reshape(shape)
        zero = self.grid.zero.repeat_interleave(sizes).reshape(shape)
        return Grid(scale, zero, self.grid.qmin, self.grid.qmax).fake(x)


@dataclass
class DynamicActivation:
    """Per-token, per-group symmetric grid computed on the fly (SVDQuant's INT4 activation format)."""

    bits: int
    group: int
    conv: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        axis = channel_axis(x, self.conv)
        moved = x.movedim(axis, -1)
        channels = moved.shape[-1]
        pad = (-channels) % self.group
        padded = F.pad(moved, (0, pad))
        groups = padded.reshape(*padded.shape[:-1], -1, self.group)
        amax = groups.abs().amax(-1, keepdim=True)
        grid = grid_from_range(-amax, amax, self.bits, symmetric=True)
        out = grid.fake(groups).reshape(padded.shape)[..., :channels]
        return out.movedim(-1, axis)


@dataclass
class TimeGridNet:
    """TDQ's interval generator: one tiny MLP per (layer, input segment) *unit*, batched over units.

    The timestep, normalised as ``u = t / t_scale``, is Fourier-encoded (``sin`` and ``cos`` of
    ``pi * 2^k * u`` for ``k < bands``), goes through two ReLU layers of ``hidden`` units and comes out as two
    numbers; softplus keeps them positive, so the range is ``lo = -softplus(o0) * ref``, ``hi = softplus(o1) *
    ref`` (``ref``: the unit's static range, so the outputs are of order one). Stored flat, one row per unit:
    ``[bands, hidden, t_scale, ref, W1, b1, W2, b2, W3, b3]``.
    """

    bands: int
    hidden: int
    t_scale: torch.Tensor  # (units,)
    ref: torch.Tensor  # (units,)
    params: list[torch.Tensor]  # W1 (units, hidden, 2 bands), b1, W2, b2, W3 (units, 2, hidden), b3

    HEADER = 4

    @staticmethod
    def shapes(bands: int, hidden: int) -> list[tuple[int, ...]]:
        return [(hidden, 2 * bands), (hidden,), (hidden, hidden), (hidden,), (2, hidden), (2,)]

    def ranges(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)``, each ``(units, T)``, at timesteps ``t`` of shape ``(units, T)``."""
        freqs = math.pi * 2.0 ** torch.arange(self.bands, dtype=torch.float32)
        angles = (t / self.t_scale[:, None])[..., None] * freqs
        x = torch.cat([angles.sin(), angles.cos()], -1)
        w1, b1, w2, b2, w3, b3 = self.params
        h = torch.relu(torch.einsum("uhk,utk->uth", w1, x) + b1[:, None])
        h = torch.relu(torch.einsum("uij,utj->uti", w2, h) + b2[:, None])
        out = F.softplus(torch.einsum("uoh,uth->uto", w3, h) + b3[:, None]) * self.ref[:, None, None]
        return -out[..., 0], out[..., 1]

    def flat(self) -> torch.Tensor:
        units = len(self.ref)
        header = torch.stack([torch.full((units,), float(self.bands)), torch.full((units,), float(self.hidden)),
                              self.t_scale.float(), self.ref.float()], 1)
        return torch.cat([header, *(p.detach().reshape(units, -1) for p in self.params)], 1).float().contiguous()

    @classmethod
    def from_flat(cls, flat: torch.Tensor) -> TimeGridNet:
        bands, hidden = int(flat[0, 0]), int(flat[0, 1])
        params, at = [], cls.HEADER
        for shape in cls.shapes(bands, hidden):
            size = math.prod(shape)
            params.append(flat[:, at:at + size].reshape(len(flat), *shape))
            at += size
        if at != flat.shape[1]:
            raise ValueError(f"a timestep grid generator row has {flat.shape[1]} values, expected {at}")
        return cls(bands, hidden, flat[:, 2], flat[:, 3], params)


class TimestepActivation:
    """Per-tensor (per segment) activation grid that is a function of the current timestep (TDQ).

    The timestep is read at call time from the step context; each distinct timestep's grid is generated once
    and kept, so sampling pays the generator once per step, not per call (the paper's pre-computed intervals).
    """

    def __init__(self, net: TimeGridNet, bits: int, segments: list[int], conv: bool, clock: StepContext) -> None:
        self.net, self.bits, self.segments, self.conv, self.clock = net, bits, segments, conv, clock
        self._grids: dict[float, StaticActivation] = {}

    def at(self, t: float) -> StaticActivation:
        """The static grid this layer uses at timestep ``t``."""
        if t not in self._grids:
            if len(self._grids) >= TIME_GRIDS_KEPT:
                self._grids.clear()
            with torch.no_grad():
                lo, hi = self.net.ranges(torch.full((len(self.net.ref), 1), float(t)))
            self._grids[t] = StaticActivation(grid_from_range(lo[:, 0], hi[:, 0], self.bits, symmetric=False),
                                              self.segments, self.conv)
        return self._grids[t]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t = self.clock.timestep
        if t is None:
            raise RuntimeError("the denoiser ran without a timestep; a timestep-dependent activation grid needs one")
        return self.at(t)(x)


class TemporalActivation:
    """A per-timestep grid table (EfficientDM's TALSQ steps, TFMQ's finite-set grids): the static activation
    grid of the calibration timestep nearest the current one.

    ``ctx.timestep`` is set by the core's hook on the denoiser before every call; outside a pipeline call
    (no timestep) the layer's stored grid is used.
    """

    def __init__(self, ctx: StepContext, timesteps: Sequence[float], grids: Sequence[StaticActivation],
                 fallback: Any) -> None:
        order = sorted(range(len(timesteps)), key=lambda i: timesteps[i])
        self.ctx = ctx
        self.timesteps = [float(timesteps[i]) for i in order]
        self.grids = [grids[i] for i in order]
        self.fallback = fallback

    def nearest(self, t: float) -> int:
        i = bisect.bisect_left(self.timesteps, t)
        if i == 0:
            return 0
        if i == len(self.timesteps):
            return i - 1
        return i if self.timesteps[i] - t < t - self.timesteps[i - 1] else i - 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t = self.ctx.timestep
        if t is None:
            return self.fallback(x)
        return self.grids[self.nearest(t)](x)


# ---------------------------------------------------------------- the layer that runs in place of a Linear/Conv2d


class FakeQuantLayer:
    """Replaces one ``nn.Linear`` / ``nn.Conv2d`` forward: quantized input times dequantized weight.

    Optionally the input is first divided per channel by ``smooth`` (SVDQuant's outlier migration, the
    weight already multiplied by it) and a floating-point low-rank branch ``up(down(x))`` is added.
    """

    def __init__(self, module: nn.Module, weight: torch.Tensor, activation: StaticActivation |
                 DynamicActivation | TimestepActivation | None = None, smooth: torch.Tensor | None = None,
                 low_rank: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.module, self.weight, self.activation = module, weight, activation
        self.conv = isinstance(module, nn.Conv2d)
        self.smooth, self.low_rank = smooth, low_rank

    def _apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.conv:
            return self.module._conv_forward(x, weight, bias)
        return F.linear(x, weight, bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth is not None:
            shape = [1] * x.ndim
            shape[channel_axis(x, self.conv)] = -1
            x = x / self.smooth.reshape(shape)
        quantized = self.activation(x) if self.activation is not None else x
        out = self._apply(quantized, self.weight.to(x.dtype), self.module.bias)
        if self.low_rank is not None:
            down, up = (t.to(x.dtype) for t in self.low_rank)
            hidden = self._apply(x, down, None)
            out = out + (F.conv2d(hidden, up) if self.conv else F.linear(hidden, up))
        return out
