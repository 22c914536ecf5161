"""PTQ4DiT: balance salient channels between activations and weights, calibrated over timesteps (simulated)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from effdiff.context import StepContext
from effdiff.methods.quant.lowbit.base import QuantMethod
from effdiff.methods.quant.lowbit.fake import Observer, channel_axis, is_quantized, to_rows, weight_grid
from effdiff.methods.quant.lowbit.observe import LayerInputs, calibration_prompts, run_pipeline, target_layers
from effdiff.methods.quant.lowbit.packed import LayerQuant
from effdiff.methods.quant.lowbit.ptq import naive_layer, static_activation
from effdiff.methods.quant.lowbit.svdquant import smoothing
from effdiff.registry import Paper, Param, RecipeError

PTQ4DIT = Paper("PTQ4DiT: Post-training Quantization for Diffusion Transformers", "2405.16005", "NeurIPS 2024")


def ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, ties sharing their average rank (what Spearman's rho needs)."""
    order = torch.argsort(values, stable=True)
    _, inverse, counts = torch.unique_consecutive(values[order], return_inverse=True, return_counts=True)
    counts = counts.double()
    average = counts.cumsum(0) - (counts - 1) / 2
    out = torch.empty(values.numel(), dtype=torch.float64)
    out[order] = average[inverse]
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two equally long vectors; 0 when either is constant."""
    ra, rb = ranks(a.flatten()), ranks(b.flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float(ra @ rb) / denom if denom > 0 else 0.0


def ssc_weights(rhos: torch.Tensor) -> torch.Tensor:
    """PTQ4DiT's timestep weights ``eta_t = exp(-rho_t) / sum exp(-rho)``: the most complementary timesteps
    (activation and weight salience least rank-correlated, where balancing removes the most error) count most."""
    return torch.softmax(-rhos.double(), 0).float()


def calibrated_salience(per_step: torch.Tensor, w_salience: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SSC: the activation salience ``sum_t eta_t s(X^(t))`` of ``per_step`` (timesteps x channels), and rho_t."""
    rhos = torch.tensor([spearman(step, w_salience) for step in per_step], dtype=torch.float64)
    return ssc_weights(rhos) @ per_step.float(), rhos


def weight_salience(weight: torch.Tensor) -> torch.Tensor:
    """``s(W_j) = max |W_j|`` per input channel (over outputs and, for convolutions, the kernel window)."""
    inp = weight.shape[1]
    return weight.detach().float().abs().transpose(0, 1).reshape(inp, -1).amax(1)


def channel_shape(x: torch.Tensor, conv: bool) -> list[int]:
    """Shape broadcasting a per-channel vector along ``x``'s channel axis."""
    shape = [1] * x.ndim
    shape[channel_axis(x, conv)] = -1
    return shape


def balanced_layer(module: nn.Module, factors: torch.Tensor | None, observer: Observer | None, wbits: int,
                   abits: int, method: str, percentile: float) -> LayerQuant:
    """Per-output-channel weight grid of ``W * B`` and per-tensor grid of ``X / B`` (``observer`` saw ``X / B``).

    ``factors`` None is the unbalanced (naive) layer. With float weights the record keeps the original weight
    and ``smooth``; ``LayerQuant.weight`` multiplies it in, so ``X / B @ (W * B)`` is ``X W`` up to rounding.
    """
    if factors is None:
        return naive_layer(module, observer, wbits, abits, method, percentile)  # type: ignore[arg-type]
    act = static_activation(observer, abits, method, percentile) if is_quantized(abits) else {"abits": abits}
    if not is_quantized(wbits):
        return LayerQuant(list(module.weight.shape), wbits, smooth=factors, **act)
    weight = module.weight.detach().float()
    weight = weight * factors.reshape(1, -1, *([1] * (weight.ndim - 2)))
    grid, scale, zero = weight_grid(weight, wbits, method, percentile=percentile)
    return LayerQuant.from_codes(grid.codes(weight), scale, zero, [0, weight.shape[1]], wbits, False,
                                 smooth=factors, **act)


class PTQ4DiT(QuantMethod):
    """PTQ4DiT (Wu et al., arXiv 2405.16005, NeurIPS 2024): Channel-wise Salience Balancing (CSB) guided by
    Spearman's rho Salience Calibration (SSC), then plain per-channel weight / per-tensor activation grids.

    In a Linear ``X W`` (and a Conv2d, seen as its im2col matrix) some input channels ``j`` are *salient* —
    ``s(X_j) = max |X_j|`` or ``s(W_j) = max |W_j|`` extreme — but rarely both at once. CSB balances each
    channel to ``sqrt(s(X_j) s(W_j))``: the input is divided and the weight multiplied by
    ``B_j = sqrt(s(X_j) / s(W_j))`` (SmoothQuant's migration at strength 0.5), which leaves ``X W`` unchanged.
    Activation salience moves over the denoising trajectory, so SSC records ``s(X^(t))`` at every calibration
    timestep ``t`` (keyed by the step context's timestep), computes Spearman's ``rho_t`` between ``s(X^(t))``
    and ``s(W)``, and uses ``s(X_j) = sum_t eta_t s(X_j^(t))`` with ``eta = softmax(-rho)``: timesteps where
    activation and weight salience are most complementary (lowest rho, where balancing removes the most
    error) weigh most. ``ssc=false`` uses the maximum over all timesteps instead; ``balance=false`` is plain
    PTQ with the same grids. Grids: per-output-channel weights and per-tensor activations, asymmetric, their
    ranges by least squared error (``range=mse``, as the paper's code initialises them) or min-max /
    percentile; a second calibration pass observes the *balanced* inputs for the activation grids.

    Differences from the paper: (1) the balancing stays an explicit per-channel divide in the fake-quant layer
    (``LayerQuant.smooth``) instead of the paper's offline re-parameterisation into the adaLN MLP and the
    preceding matmul, so it is applied to every quantized Linear / Conv2d — also the second MLP linear and
    cross-attention projections, whose inputs could not be folded — and a deployment would pay the divide
    there; the stored size counts the factors; (2) no AdaRound / block reconstruction afterwards (the
    paper's code runs Q-Diffusion-style reconstruction; ``qdiffusion`` is that part here); (3) attention
    matmuls stay in float. Nothing in the maths is DiT-specific, so U-Nets are handled the same way (convs
    through their input channels; zero padding stays zero under the divide). ViDiT-Q (Zhao et al., arXiv
    2406.02540) reports the same timestep-varying channel imbalance and answers it with per-timestep
    ("dynamic") balancing plus rotation; nothing of it is implemented here: one static ``B`` per layer, as
    PTQ4DiT. Input and output layers stay in float. Simulated: outputs are the integer model's, speed is not.
    """

    name = "ptq4dit"
    paper = PTQ4DIT
    summary = "simulated low-bit PTQ for DiTs: salience balancing between weights and activations, rho-weighted"
    params = {
        **QuantMethod.common,
        "range": Param(str, "mse", choices=("minmax", "percentile", "mse"), help="how grids cover the values"),
        "percentile": Param(float, 99.99, 90.0, 100.0, help="with range=percentile: clip beyond this percentile"),
        "balance": Param(bool, True, help="channel-wise salience balancing (false: plain PTQ with these grids)"),
        "ssc": Param(bool, True, help="rho-weighted salience over timesteps (false: the maximum over timesteps)"),
    }

    def apply(self, pipe: Any, ctx: StepContext) -> None:
        self._ctx = ctx  # calibration keys activation salience by the current timestep
        super().apply(pipe, ctx)

    def calibrate(self, pipe: Any) -> dict[str, LayerQuant]:
        wbits, abits = self.values["wbits"], self.values["abits"]
        method, pct = self.values["range"], self.values["percentile"]
        keep = method != "minmax"
        per_step: dict[str, dict[float, torch.Tensor]] = {}

        def record(name: str, module: nn.Module, x: torch.Tensor) -> None:
            key = self._ctx.timestep if self._ctx.timestep is not None else float(self._ctx.call_index)
            amax = to_rows(x, channel_axis(x, isinstance(module, nn.Conv2d))).abs().amax(1)
            steps = per_step.setdefault(name, {})
            steps[key] = amax if key not in steps else torch.maximum(steps[key], amax)

        with LayerInputs(target_layers(self.adapter), record):  # beside observe()'s own hooks, same pipeline run
            layers, observers, order, _ = self.observe(pipe, keep_values=keep and not self.values["balance"])
        self._rhos: list[float] = []
        self._steps = len(per_step[order[0]])
        if not self.values["balance"]:
            return {n: balanced_layer(layers[n], None, observers[n], wbits, abits, method, pct) for n in order}
        factors = {name: self._factors(name, layers[name], per_step[name]) for name in order}
        balanced = self._observe_balanced(pipe, {n: layers[n] for n in order}, factors, keep) \
            if is_quantized(abits) else {}
        return {n: balanced_layer(layers[n], factors[n], balanced.get(n), wbits, abits, method, pct) for n in order}

    def _factors(self, name: str, module: nn.Module, per_step: dict[float, torch.Tensor]) -> torch.Tensor:
        """CSB factors ``B = sqrt(s(X) / s(W))`` of one layer, ``s(X)`` from SSC (or the maximum over steps)."""
        w_sal = weight_salience(module.weight)
        steps = torch.stack(list(per_step.values()))
        if steps.shape[1] != w_sal.numel():
            raise RecipeError(f"ptq4dit: the inputs {name} saw do not match its weight's input channels")
        if self.values["ssc"]:
            x_sal, rhos = calibrated_salience(steps, w_sal)
            self._rhos.extend(rhos.tolist())
        else:
            x_sal = steps.amax(0)
        return smoothing(x_sal, w_sal, 0.5)

    def _observe_balanced(self, pipe: Any, layers: dict[str, nn.Module], factors: dict[str, torch.Tensor],
                          keep: bool) -> dict[str, Observer]:
        """A second calibration run observing each layer's *balanced* input ``X / B`` for its activation grid."""
        observers: dict[str, Observer] = {}

        def visit(name: str, module: nn.Module, x: torch.Tensor) -> None:
            conv = isinstance(module, nn.Conv2d)
            if name not in observers:
                observers[name] = Observer(conv, keep_values=keep)
            observers[name].update(x / factors[name].reshape(channel_shape(x, conv)))

        with LayerInputs(layers, visit):
            run_pipeline(pipe, calibration_prompts(pipe, self.values["prompts"]), self.values["seed"],
                         self.values["steps"])
        return observers

    def calibration_notes(self) -> dict[str, Any]:
        notes: dict[str, Any] = {"kept_float": self._kept_float, "timesteps": self._steps}
        if self._rhos:
            rhos = torch.tensor(self._rhos)
            notes.update(rho_mean=round(float(rhos.mean()), 4),
                         rho_min=round(float(rhos.min()), 4), rho_max=round(float(rhos.max()), 4))
        return notes
