"""Simulated low-bit post-training quantization: the naive baseline (``ptq``) and Q-Diffusion (``qdiffusion``).

Both calibrate on the pipeline's own samples (``observe.py``), store the result as packed codes
(``packed.py``) and run fake-quant layers (``fake.py``) patched onto the Linear / Conv2d *instances*, so the
module tree and state dict never change and ``remove`` restores the pipeline bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from effdiff.methods.quant.lowbit.base import QuantMethod
from effdiff.methods.quant.lowbit.fake import (
    Grid,
    Observer,
    is_quantized,
    weight_grid,
)
from effdiff.methods.quant.lowbit.observe import (
    LayerInputs,
    calibration_prompts,
    run_pipeline,
)
from effdiff.methods.quant.lowbit.packed import LayerQuant
from effdiff.registry import Paper, Param

INTEGER_ONLY = Paper("Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference",
                     "1712.05877", "CVPR 2018")
QDIFFUSION = Paper("Q-Diffusion: Quantizing Diffusion Models", "2302.04304", "ICCV 2023")
def static_activation(observer: Observer, abits: int, method: str, percentile: float) -> dict[str, Any]:
    """LayerQuant fields of a calibrated per-tensor (per-segment) activation grid; none when kept in float."""
    if not is_quantized(abits):
        return {"abits": abits}
    grid = observer.grid(abits, method, percentile)
    segments = observer.segments or [0, observer.channels]
    return {"abits": abits, "act_scale": grid.scale, "act_zero": grid.zero, "act_segments": segments}


def naive_layer(module: nn.Module, observer: Observer, wbits: int, abits: int, method: str,
                percentile: float) -> LayerQuant:
    """Per-output-channel weight grid and per-tensor activation grid, both from ranges (min-max or percentile)."""
    act = static_activation(observer, abits, method, percentile)
    if not is_quantized(wbits):
        return LayerQuant(list(module.weight.shape), wbits, **act)
    grid, scale, zero = weight_grid(module.weight, wbits, method, percentile=percentile)
    return LayerQuant.from_codes(grid.codes(module.weight.float()), scale, zero, [0, module.weight.shape[1]], wbits,
                                 False, **act)


class PTQ(QuantMethod):
    """Naive post-training quantization: min-max (or percentile) grids, nothing diffusion-specific.

    The uniform affine scheme of Jacob et al. (arXiv 1712.05877, CVPR 2018): per-output-channel asymmetric
    weight grids from each channel's min and max (or its ``percentile``), per-tensor asymmetric activation
    grids from the min and max (or percentiles) seen over ``prompts`` calibration samples at every denoising
    step. Every Linear and Conv2d is quantized except the input and output layers (kept in float, as the
    diffusion PTQ papers do); attention matmuls stay in float. ``wbits=32,abits=32`` quantizes nothing and
    is bit-identical to the pipeline. Simulated: outputs are those of the integer model, speed is not.
    """

    name = "ptq"
    paper = INTEGER_ONLY
    summary = "simulated low-bit PTQ baseline: min-max / percentile per-channel weights, per-tensor activations"
    params = {
        **QuantMethod.common,
        "range": Param(str, "minmax", choices=("minmax", "percentile"), help="how grids cover the values"),
        "percentile": Param(float, 99.99, 90.0, 100.0, help="with range=percentile: clip beyond this percentile"),
    }

    def calibrate(self, pipe: Any) -> dict[str, LayerQuant]:
        method, pct = self.values["range"], self.values["percentile"]
        wbits, abits = self.values["wbits"], self.values["abits"]
        layers, observers, order, _ = self.observe(pipe, keep_values=method != "minmax")
        return {name: naive_layer(layers[name], observers[name], wbits, abits, method, pct) for name in order}

    def calibration_notes(self) -> dict[str, Any]:
        return {"kept_float": self._kept_float}


# ---------------------------------------------------------------- Q-Diffusion


ZETA, GAMMA = 1.1, -0.1  # AdaRound's rectified sigmoid stretch


def _rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


class Moments:
    """Second moments of one layer's inputs, enough to evaluate ``|W~ Q(x) - W x|^2`` for any W~ exactly.

    With ``x~ = Q(x)`` and ``e = x~ - x``: error = ``(W~ - W) x~ + W e``, so the squared error summed over
    rows needs ``A = sum x~ x~^T``, ``D = sum x~ e^T`` and ``E = sum e e^T`` (written in the error form so
    the float32 sums do not cancel). Rows are a seeded random subset of each call's rows (im2col patches
    for convolutions).
    """

    def __init__(self, module: nn.Module, activation: Callable[[torch.Tensor], torch.Tensor] | None,
                 rows_per_call: int, seed: int) -> None:
        self.module, self.activation, self.rows_per_call = module, activation, rows_per_call
        self.generator = torch.Generator().manual_seed(seed)
        d = module.weight[0].numel()
        self.A = torch.zeros(d, d, dtype=torch.float64)
        self.D = torch.zeros(d, d, dtype=torch.float64)
        self.E = torch.zeros(d, d, dtype=torch.float64)
        self.rows = 0
        self._cast: dict[torch.dtype, tuple[torch.Tensor, ...]] = {}

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros":
                x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
                padding: Any = 0
            else:
                padding = m.padding
            cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)
            return cols.transpose(1, 2).reshape(-1, cols.shape[1])
        return x.reshape(-1, x.shape[-1])

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        xq = self.activation(x) if self.activation is not None else x
        rows, rows_q = self._rows(x), self._rows(xq)
        take = torch.randperm(rows.shape[0], generator=self.generator)[: self.rows_per_call]
        xt, xqt = rows[take].double(), rows_q[take].double()
        err = xqt - xt
        self.A += xqt.T @ xqt
        self.D += xqt.T @ err
        self.E += err.T @ err
        self.rows += len(take)

    def error(self, delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Mean over rows of the squared output error for ``W~ = weight + delta`` (both ``(out, d)``)."""
        if delta.dtype not in self._cast:
            self._cast[delta.dtype] = tuple(t.to(delta.dtype) for t in (self.A, self.D, self.E))
        A, D, E = self._cast[delta.dtype]
        total = ((delta @ A) * delta).sum() + 2 * ((delta @ D) * weight).sum() + ((weight @ E) * weight).sum()
        return total / max(self.rows, 1)


def adaround(weight: torch.Tensor, grid: Grid, moments: Moments, iters: int, lr: float = 2e-2,
             reg: float = 0.1, warmup: float = 0.2) -> tuple[torch.Tensor, float, float]:
    """AdaRound (Nagel et al. 2020) on the exact layer-output loss: learn per weight whether to round down or
    up; returns the codes and the output error of rounding-to-nearest and of the learned rounding.

    ``weight`` and the grid's scale/zero are ``(out, d)``; the regulariser ``1 - |2h - 1|^beta`` (beta
    annealed 20 -> 2 after a warm-up) drives every soft rounding ``h`` to 0 or 1. The learned rounding is kept
    only if its hard version beats rounding to nearest.
    """
    w = weight.float()
    s, z = grid.scale, grid.zero
    base = torch.floor(w / s)
    rest = (w / s - base).clamp(1e-4, 1 - 1e-4)
    wd = w.double()

    def dequant(h: torch.Tensor) -> torch.Tensor:
        return (torch.clamp(base + h + z, grid.qmin, grid.qmax) - z) * s

    nearest_codes = grid.codes(w)
    nearest = float(moments.error(grid.dequantize(nearest_codes).double() - wd, wd))
    if iters <= 0 or nearest <= 0:
        return nearest_codes, nearest, nearest
    v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=lr)
    start = int(warmup * iters)
    with torch.enable_grad():
        for i in range(iters):
            h = _rectified_sigmoid(v)
            loss = moments.error(dequant(h) - w, w) / nearest
            if i >= start:
                beta = 20 + (2 - 20) * (i - start) / max(iters - start - 1, 1)
                loss = loss + reg * (1 - (2 * h - 1).abs().pow(beta)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    hard = (v.detach() >= 0).float()  # h >= 0.5  <=>  v >= logit((0.5 - GAMMA) / (ZETA - GAMMA)) = 0
    learned_codes = torch.clamp(base + hard + z, grid.qmin, grid.qmax)
    learned = float(moments.error(grid.dequantize(learned_codes).double() - wd, wd))
    if learned < nearest:
        return learned_codes, nearest, learned
    return nearest_codes, nearest, nearest


class QDiffusion(QuantMethod):
    """Q-Diffusion: time-step-aware calibration, AdaRound reconstruction and split shortcut quantization.

    Paper: Li et al., "Q-Diffusion: Quantizing Diffusion Models" (arXiv 2302.04304, ICCV 2023), building on
    PTQ4DM (Shang et al., "Post-training Quantization on Diffusion Models", arXiv 2211.15736, CVPR 2023),
    which first built the calibration set from the sampling trajectory. Here:

    - calibration data: ``prompts`` samples drawn by the full-precision pipeline; every layer's input is
      observed at *every* denoising step, and the moment statistics below sample rows uniformly over the
      steps (the paper's uniform time-step calibration set);
    - activation grids: per tensor, the range with the least squared quantization error over those samples
      (the paper's MSE-based step size) instead of min-max;
    - weights: per-output-channel grids by least squared error, then AdaRound (the per-layer form of the
      BRECQ/AdaRound reconstruction the paper uses): ``iters`` Adam steps choosing each weight's rounding
      to minimise the layer's output error *with its quantized input*, evaluated exactly from second moments
      of ``rows`` sampled input rows (im2col patches for convolutions), so no activations are stored;
    - split quantization (``split=true``): the inputs of each U-Net up-block resnet's first conv and
      shortcut conv are the concat of upsampled and skip features, whose ranges differ (the paper's
      bimodal shortcut); each half gets its own activation grid and its own weight grid per output channel.

    Input and output layers stay in float; attention matmuls are not quantized. Block-wise (BRECQ)
    reconstruction and the quantized attention matmuls of the paper are not implemented. Simulated.
    """

    name = "qdiffusion"
    paper = QDIFFUSION
    summary = "simulated low-bit PTQ: time-step-aware calibration, AdaRound, split skip-concat quantization"
    params = {
        **QuantMethod.common,
        "iters": Param(int, 300, 0, 20000, help="AdaRound steps per layer (0: round to nearest)"),
        "rows": Param(int, 4096, 64, 1_000_000, help="input rows sampled per layer for the reconstruction loss"),
        "split": Param(bool, True, help="separate grids for the two halves of U-Net skip concats"),
    }

    def calibrate(self, pipe: Any) -> dict[str, LayerQuant]:
        layers, observers, order, splits = self.observe(pipe, keep_values=True, split=self.values["split"])
        acts = {name: static_activation(observers[name], self.values["abits"], "mse", 100.0) for name in order}
        return self.reconstruct(pipe, layers, observers, order, splits, acts)

    def reconstruct(self, pipe: Any, layers: dict[str, nn.Module], observers: dict[str, Observer], order: list[str],
                    splits: dict[str, int], acts: dict[str, dict[str, Any]]) -> dict[str, LayerQuant]:
        """Weights by MSE grids + AdaRound against each layer's *quantized* inputs (``acts``: its LayerQuant
        activation fields), seen over a second calibration call; returns the layers' records."""
        wbits, seed = self.values["wbits"], self.values["seed"]
        moments = {}
        for i, name in enumerate(order):
            module = layers[name]
            quantizer = LayerQuant(list(module.weight.shape), wbits, **acts[name]).activation(
                isinstance(module, nn.Conv2d), self.ctx)
            per_call = math.ceil(self.values["rows"] / max(observers[name].calls, 1))
            moments[name] = Moments(module, quantizer, per_call, seed * 100_003 + i)
        with LayerInputs({n: layers[n] for n in order}, lambda n, m, x: moments[n].update(x)):
            run_pipeline(pipe, calibration_prompts(pipe, self.values["prompts"]), seed, self.values["steps"])
        out, errors = {}, []
        for name in order:
            module, act = layers[name], acts[name]
            if not is_quantized(wbits):
                out[name] = LayerQuant(list(module.weight.shape), wbits, **act)
                continue
            inp = module.weight.shape[1]
            segments = [0, splits[name], inp] if name in splits else [0, inp]
            grid, scale, zero = weight_grid(module.weight, wbits, "mse", segments=segments)
            shape = module.weight.shape
            flat = Grid(grid.scale.expand(shape).reshape(shape[0], -1), grid.zero.expand(shape).reshape(shape[0], -1),
                        grid.qmin, grid.qmax)
            codes, nearest, learned = adaround(module.weight.reshape(shape[0], -1), flat, moments[name],
                                               self.values["iters"])
            errors.append((name, nearest, learned))
            out[name] = LayerQuant.from_codes(codes.reshape(shape), scale, zero, segments, wbits, False, **act)
        self._errors = errors
        self._splits = splits
        return out

    def calibration_notes(self) -> dict[str, Any]:
        errors = getattr(self, "_errors", [])
        improved = [learned / nearest for _, nearest, learned in errors if nearest > 0]
        return {"kept_float": self._kept_float, "split_layers": sorted(self._splits),
                "adaround_error_ratio_mean": round(sum(improved) / len(improved), 4) if improved else None}
