"""Trainable fake-quant pieces of EfficientDM: a quantization-aware LoRA layer with straight-through rounding.

The training forward computes *exactly* what the stored integer model computes (same ops in the same order as
``Grid.codes`` / ``Grid.dequantize`` and ``FakeQuantLayer``); only the gradient differs (straight-through
rounding). So the records written after training reproduce the trained forward bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from effdiff.methods.quant.lowbit.fake import (
    Grid,
    channel_axis,
    expand_segments,
    is_quantized,
    levels,
    segment_sizes,
)
from effdiff.methods.quant.lowbit.packed import LayerQuant


class _RoundSTE(torch.autograd.Function):
    """``round`` forward, identity backward (the straight-through estimator)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


def fake_quant_ste(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``Grid(scale, zero, qmin, qmax).fake(x)`` with straight-through rounding: LSQ gradients for ``scale``
    (``round(x/s) - x/s`` inside the range, the clipped level outside) and identity for ``x`` inside it."""
    codes = torch.clamp(_RoundSTE.apply(x / scale) + zero, qmin, qmax)
    return (codes - zero) * scale


class QALoRALayer:
    """One Linear / Conv2d during EfficientDM fine-tuning, called in place of the module's forward.

    Weight: ``W' = W + s0 * (B @ A)`` (the LoRA product in units of the initial per-channel weight step
    ``s0``: the paper's scale-aware LoRA optimisation, which scales each layer's LoRA learning rate by its
    weight step, here per output channel), then fake-quantized on its grid with learned step ``s0 * exp(v)``
    and the initial integer zero point. Input: fake-quantized with a learned step ``a0 * exp(u[row])`` per
    table row (one row per timestep with TALSQ, a single row without). The exponential parametrisation makes
    Adam's step a relative change of the step size and starts exactly at the PTQ grids.
    """

    def __init__(self, module: nn.Module, init: LayerQuant, rank: int, rows: int, generator: torch.Generator) -> None:
        self.module = module
        self.conv = isinstance(module, nn.Conv2d)
        self.init = init
        self.row = 0
        self.base = module.weight.detach().float()
        shape = self.base.shape
        self.weight_quantized = is_quantized(init.wbits) and init.scale is not None and init.zero is not None
        self.act_quantized = is_quantized(init.abits) and init.act_scale is not None and init.act_zero is not None
        self.lora: list[torch.Tensor] = []
        self.scales: list[torch.Tensor] = []
        if self.weight_quantized:
            assert init.scale is not None and init.zero is not None
            self.w_qmin, self.w_qmax = levels(init.wbits, init.symmetric)
            self.s0 = init.scale.float()
            self.zero = expand_segments(init.zero.float(), init.segments, len(shape))
            fan_in = self.base[0].numel()
            r = min(rank, shape[0], fan_in)
            bound = 1 / math.sqrt(fan_in)  # kaiming-uniform(a=sqrt 5), LoRA's usual init of A; B starts at 0
            self.a = ((torch.rand(r, fan_in, generator=generator) * 2 - 1) * bound).requires_grad_(True)
            self.b = torch.zeros(shape[0], r, requires_grad=True)
            self.v = torch.zeros_like(self.s0, requires_grad=True)
            self.lora, self.scales = [self.a, self.b], [self.v]
        if self.act_quantized:
            assert init.act_scale is not None and init.act_zero is not None
            self.a_qmin, self.a_qmax = levels(init.abits, False)
            self.a0 = init.act_scale.float()
            self.u = torch.zeros(rows, self.a0.numel(), requires_grad=True)
            self.scales.append(self.u)

    # --- the quantities the stored record is made of ----------------------------------------------------
    def merged_weight(self) -> torch.Tensor:
        """``W + s0 * (B @ A)`` (float; the LoRA merged before quantization)."""
        shape = self.base.shape
        step = expand_segments(self.s0, self.init.segments, len(shape))
        return self.base + step * (self.b @ self.a).reshape(shape)

    def weight_scale(self) -> torch.Tensor:
        """Compact ``(out, n_segments)`` learned weight step."""
        return self.s0 * torch.exp(self.v)

    def act_scales(self) -> torch.Tensor:
        """``(rows, n_segments)`` learned activation steps (always computed whole, so a row's values do not
        depend on which row is asked for: vectorised and scalar ``exp`` may differ in the last bit)."""
        return self.a0 * torch.exp(self.u)

    def weight(self) -> torch.Tensor:
        if not self.weight_quantized:
            return self.base
        full = expand_segments(self.weight_scale(), self.init.segments, self.base.ndim)
        return fake_quant_ste(self.merged_weight(), full, self.zero, self.w_qmin, self.w_qmax)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        if not self.act_quantized:
            return x
        assert self.init.act_zero is not None
        axis = channel_axis(x, self.conv)
        shape = [1] * x.ndim
        shape[axis] = x.shape[axis]
        sizes = torch.tensor(segment_sizes(self.init.act_segments))
        scale = self.act_scales()[self.row].repeat_interleave(sizes).reshape(shape)
        zero = self.init.act_zero.float().repeat_interleave(sizes).reshape(shape)
        return fake_quant_ste(x, scale, zero, self.a_qmin, self.a_qmax)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight().to(x.dtype)
        quantized = self.activation(x)
        if self.conv:
            return self.module._conv_forward(quantized, weight, self.module.bias)
        return F.linear(quantized, weight, self.module.bias)

    # --- after training -------------------------------------------------------------------------------
    @torch.no_grad()
    def record(self, act_row: int | None) -> LayerQuant:
        """The integer record of the trained layer: merged weight codes on the learned grid, and the
        activation grid of table row ``act_row`` (None: the geometric mean of the rows' steps)."""
        init = self.init
        act: dict[str, Any] = {"abits": init.abits}
        if self.act_quantized:
            scale = self.a0 * torch.exp(self.u.mean(0)) if act_row is None else self.act_scales()[act_row]
            act.update(act_scale=scale.detach().clone(), act_zero=init.act_zero, act_segments=init.act_segments)
        if not self.weight_quantized:
            return LayerQuant(list(self.base.shape), init.wbits, **act)
        assert init.zero is not None
        scale = self.weight_scale()
        grid = Grid(expand_segments(scale, init.segments, self.base.ndim), self.zero, self.w_qmin, self.w_qmax)
        return LayerQuant.from_codes(grid.codes(self.merged_weight()), scale, init.zero, init.segments,
                                     init.wbits, init.symmetric, **act)

    @torch.no_grad()
    def act_table(self) -> list[list[float]]:
        """Learned activation steps, one row per table row (for the info JSON; float32 values round-trip)."""
        if not self.act_quantized:
            return []
        return self.act_scales().tolist()
