"""SVDQuant: smooth activation outliers into the weights, absorb them in a float low-rank branch, W4A4 the rest."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from effdiff.methods.quant.lowbit.base import QuantMethod
from effdiff.methods.quant.lowbit.fake import is_quantized, weight_grid
from effdiff.methods.quant.lowbit.packed import LayerQuant
from effdiff.registry import Paper, Param, RecipeError

SVDQUANT = Paper("SVDQuant: Absorbing Outliers by Low-Rank Components for 4-Bit Diffusion Models", "2411.05007",
                 "ICLR 2025")


def smoothing(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per input channel ``lambda = max|x|^alpha / max|w|^(1-alpha)`` (SmoothQuant's migration, used by SVDQuant).

    Dividing the input by ``lambda`` and multiplying the weight by it leaves ``W x`` unchanged while moving
    activation outliers into the weight, where the low-rank branch can take them.
    """
    lam = x_absmax.clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return lam.clamp(min=1e-5)


def low_rank_split(weight2d: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weight2d = up @ down + residual`` with the top ``rank`` singular directions in bf16 ``up``/``down``.

    The residual is taken against the bf16-rounded factors, so it also absorbs their rounding.
    """
    u, s, vh = torch.linalg.svd(weight2d.double(), full_matrices=False)
    # contiguous: LAPACK returns column-major factors, and a matmul's summation order follows the layout,
    # so a reloaded (contiguous) copy would differ in the last bit
    up = (u[:, :rank] * s[:rank]).float().bfloat16().contiguous()
    down = vh[:rank].float().bfloat16().contiguous()
    return up, down, weight2d - up.float() @ down.float()


def svd_layer(module: nn.Module, x_absmax: torch.Tensor, wbits: int, abits: int, rank: int, alpha: float,
              group: int) -> LayerQuant:
    """The SVDQuant record of one Linear / Conv2d given its inputs' per-channel maxima."""
    weight = module.weight.detach().float()
    shape = weight.shape
    inp = shape[1]
    w_absmax = weight.abs().transpose(0, 1).reshape(inp, -1).amax(1)
    lam = smoothing(x_absmax, w_absmax, alpha)
    smoothed = weight * lam.reshape(1, inp, *([1] * (weight.ndim - 2)))
    r = min(rank, shape[0], smoothed[0].numel())
    up, down, residual = low_rank_split(smoothed.reshape(shape[0], -1), r)
    residual = residual.reshape(shape)
    segments = list(range(0, inp, group)) + [inp]
    grid, scale, zero = weight_grid(residual, wbits, "minmax", symmetric=True, segments=segments)
    conv = isinstance(module, nn.Conv2d)
    return LayerQuant.from_codes(
        grid.codes(residual), scale, zero, segments, wbits, True, abits=abits,
        act_group=group if is_quantized(abits) else 0, smooth=lam,
        down=down.reshape(r, *shape[1:]) if conv else down, up=up.reshape(shape[0], r, 1, 1) if conv else up)


class SVDQuant(QuantMethod):
    """SVDQuant (Li et al., arXiv 2411.05007, ICLR 2025 — the method behind nunchaku), simulated.

    Per Linear / Conv2d: (1) smoothing — per input channel ``lambda = max|x|^alpha / max|w|^(1-alpha)`` from
    the calibration samples' activation maxima; the input is divided by ``lambda`` and the weight multiplied
    by it, migrating activation outliers into the weight; (2) the top-``rank`` SVD components of the smoothed
    weight become a low-rank branch kept in 16-bit (bf16 here) that runs on the unquantized smoothed input and
    absorbs the weight's outliers; (3) the residual weight is quantized to ``wbits`` with symmetric grids per
    output channel and group of ``group`` input channels, and the smoothed input to ``abits`` with symmetric
    per-token grids over the same groups, computed on the fly (the paper's INT4 format, group 64).
    Convolutions are treated as their im2col matrix (the branch is a ``rank``-channel conv then a 1x1 conv).
    Input and output layers stay in float. The stored size counts the bf16 branch and the smoothing factors.
    Simulated: nunchaku's fused W4A4 kernels are CUDA-only.
    """

    name = "svdquant"
    paper = SVDQUANT
    summary = "simulated W4A4: smoothing + float low-rank branch absorbing outliers, group-wise 4-bit residual"
    params = {
        **QuantMethod.common,
        "wbits": Param(int, 4, choices=(2, 3, 4, 5, 6, 7, 8), help="residual weight bits"),
        "abits": Param(int, 4, choices=(2, 3, 4, 5, 6, 7, 8, 16, 32), help="activation bits (16/32: float)"),
        "rank": Param(int, 8, 1, 1024, help="rank of the float low-rank branch"),
        "alpha": Param(float, 0.5, 0.0, 1.0, help="migration strength of the smoothing"),
        "group": Param(int, 64, 8, 4096, help="input channels per weight/activation quantization group"),
    }

    def calibrate(self, pipe: Any) -> dict[str, LayerQuant]:
        wbits, abits = self.values["wbits"], self.values["abits"]
        rank, alpha, group = self.values["rank"], self.values["alpha"], self.values["group"]
        layers, observers, order, _ = self.observe(pipe, keep_values=False, per_channel=True)
        out = {}
        for name in order:
            absmax = observers[name].absmax
            if absmax is None or absmax.numel() != layers[name].weight.shape[1]:
                raise RecipeError(f"svdquant: the inputs {name} saw do not match its weight's input channels")
            out[name] = svd_layer(layers[name], absmax, wbits, abits, rank, alpha, group)
        return out

    def calibration_notes(self) -> dict[str, Any]:
        return {"kept_float": self._kept_float}
