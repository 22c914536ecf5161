"""TFMQ-DM: the layers that only see the timestep are calibrated and reconstructed on their own, per timestep.

A denoiser's time embedding MLP and the projections of that embedding into each block (the *temporal information
block*) compute from the timestep alone, so over a sampling run their inputs form a finite set: one value per
timestep. Calibrating them like the image layers (one activation grid over all steps, rounding chosen against
sampled image data) disturbs the temporal features every block is modulated with. TFMQ gives those layers one
activation grid per timestep (finite set calibration) and chooses their weight rounding against the temporal
features themselves (temporal information aware reconstruction); the rest of the network is Q-Diffusion's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from effdiff.methods.quant.lowbit.fake import (
    Grid,
    Observer,
    grid_from_range,
    is_quantized,
    levels,
    weight_grid,
)
from effdiff.methods.quant.lowbit.observe import LayerInputs, target_layers
from effdiff.methods.quant.lowbit.packed import LayerQuant
from effdiff.methods.quant.lowbit.ptq import Moments, QDiffusion, adaround, static_activation
from effdiff.methods.quant.lowbit.tdq import timestep_ranges
from effdiff.patches import PatchLog
from effdiff.recording import Call, Trajectory
from effdiff.registry import Paper, Param, RecipeError

TFMQ = Paper("TFMQ-DM: Temporal Feature Maintenance Quantization for Diffusion Models", "2311.16503", "CVPR 2024")
# diffusers' names: the MLP from the sinusoid of t to the embedding, and the layers projecting the embedding into
# the blocks (U-Net resnets, PixArt's adaLN-single, DiT / SD3 / Flux adaLN-zero and output modulation)
EMBEDDERS = ("time_embedding.", "timestep_embedder.")
PROJECTIONS = ("time_emb_proj", "adaln_single.linear", "norm1.linear", "norm1_context.linear", "norm_out.linear",
               "proj_out_1")


def temporal_layers(names: Sequence[str]) -> list[str]:
    """The temporal information block among ``names`` (kept in their order)."""
    return [n for n in names if any(p in n for p in EMBEDDERS) or any(n.endswith(p) for p in PROJECTIONS)]


def temporal_features(temporal: Sequence[str]) -> list[str]:
    """The block's outputs: every projection and the last layer of each embedding MLP (PixArt's output layer
    is modulated by the embedding itself)."""
    last: dict[str, str] = {}
    for name in temporal:
        if any(p in name for p in EMBEDDERS):
            last[name.rsplit(".", 1)[0]] = name
    return [n for n in temporal if n in last.values() or not any(p in n for p in EMBEDDERS)]


def finite_set_grid(observer: Observer, times: list[float], abits: int, method: str) -> dict[str, Any]:
    """LayerQuant fields of one activation grid per calibrated timestep (the per-timestep ``method`` range)."""
    steps, lo, hi = timestep_ranges(observer, times, abits, method)
    grid = grid_from_range(lo, hi, abits, symmetric=False)
    return {"abits": abits, "act_scale": grid.scale, "act_zero": grid.zero,
            "act_segments": observer.segments or [0, observer.channels],
            "act_times": torch.tensor(steps, dtype=torch.float64)}


def _concat(trees: list[Any], batches: list[int]) -> Any:
    """Row-wise concatenation of same-shaped argument trees: tensors whose first dim is their call's batch are
    concatenated, anything else is taken from the first tree."""
    first = trees[0]
    if isinstance(first, torch.Tensor):
        if first.ndim and all(t.shape[0] == b for t, b in zip(trees, batches, strict=True)):
            return torch.cat(trees)
        return first
    if isinstance(first, (tuple, list)):
        return type(first)(_concat([t[i] for t in trees], batches) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _concat([t[k] for t in trees], batches) for k in first}
    return first


class _Done(Exception):
    """Raised after the last temporal layer ran: the rest of the denoiser is not needed."""


class Replay:
    """The temporal information block run on its finite set: one recorded denoiser call per calibrated timestep,
    all in one batch (the timestep made per row), with the sample cropped to one pixel / one patch since the
    temporal features do not depend on it; the forward stops once the last temporal layer has run."""

    def __init__(self, model: nn.Module, calls: list[Call], last: nn.Module) -> None:
        firsts: dict[float, Call] = {}
        for call in calls:
            firsts.setdefault(call.timestep, call)
        size = getattr(model.config, "patch_size", None) or 1
        trees, batches, times = [], [], []
        for call in firsts.values():
            sample = call.args[0]
            rows = sample.shape[0]
            args = (sample[..., :size, :size], *call.args[1:])
            kwargs = dict(call.kwargs)
            per_row = torch.full((rows,), call.timestep)
            if "timestep" in kwargs or len(args) < 2:
                kwargs["timestep"] = per_row
            else:
                args = (args[0], per_row, *args[2:])
            trees.append((args, kwargs))
            batches.append(rows)
            times += [call.timestep] * rows
        self.args, self.kwargs = _concat(trees, batches)
        self.times = times
        self.model, self.last = model, last

    def run(self) -> None:
        def stop(*_: Any) -> None:
            raise _Done

        handle = self.last.register_forward_hook(stop)
        try:
            self.model(*self.args, **self.kwargs)
        except _Done:
            pass
        finally:
            handle.remove()


class StraightThrough:
    """Quantizes in the forward and passes the gradient unchanged, so the rounding of upstream temporal layers
    is learned through the quantized activations downstream."""

    def __init__(self, quantize: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.quantize = quantize

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.quantize(x) - x).detach()


class RowActivation:
    """FSC during the replay: each row of the finite set quantized with its own timestep's grid."""

    def __init__(self, record: LayerQuant, times: list[float]) -> None:
        assert record.act_scale is not None and record.act_zero is not None and record.act_times is not None
        index = {t: i for i, t in enumerate(record.act_times.tolist())}
        rows = torch.tensor([index[t] for t in times])
        sizes = torch.tensor([b - a for a, b in zip(record.act_segments[:-1], record.act_segments[1:], strict=True)])
        qmin, qmax = levels(record.abits, False)
        self.grid = Grid(record.act_scale[rows].repeat_interleave(sizes, 1),
                         record.act_zero.float()[rows].repeat_interleave(sizes, 1), qmin, qmax)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.grid.fake(x)


class ReplayLayer:
    """A temporal Linear during the replay: optional row-wise input quantization, a replaceable weight; keeps
    its last input and output."""

    def __init__(self, name: str, module: nn.Module, activation: Callable[[torch.Tensor], torch.Tensor] | None,
                 rows: int) -> None:
        if not isinstance(module, nn.Linear):
            raise RecipeError(f"tfmq: temporal layer {name} is a {type(module).__name__}, not a Linear")
        self.name, self.module, self.activation, self.rows = name, module, activation, rows
        self.weight = module.weight.detach()
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[0] != self.rows:
            raise RecipeError(f"tfmq: temporal layer {self.name} got an input of shape {tuple(x.shape)}, not one "
                              "vector per sample; its input is not a function of the timestep alone")
        self.input = x
        quantized = self.activation(x) if self.activation is not None else x
        self.output = F.linear(quantized, self.weight, self.module.bias)
        return self.output


class FeatureLoss:
    """``error(delta, weight)`` for AdaRound: squared error of the temporal features (summed over features and
    channels, mean over the finite set) with one layer's weight set to ``weight + delta``, by replay."""

    def __init__(self, replay: Replay, layer: ReplayLayer, features: list[ReplayLayer],
                 targets: dict[str, torch.Tensor]) -> None:
        self.replay, self.layer, self.features, self.targets = replay, layer, features, targets

    def error(self, delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        self.layer.weight = (weight + delta).float()
        self.replay.run()
        total = sum(((f.output - self.targets[f.name]) ** 2).sum(1).mean() for f in self.features)
        return torch.as_tensor(total)


class TFMQ(QDiffusion):
    """TFMQ-DM: finite set calibration and temporal information aware reconstruction of the time embedding path.

    Paper: Huang et al., "TFMQ-DM: Temporal Feature Maintenance Quantization for Diffusion Models" (arXiv
    2311.16503, CVPR 2024). Here, simulated and post-training:

    - temporal information block: the time embedding MLP (``time_embedding.linear_1/2`` on U-Nets,
      ``adaln_single.emb.timestep_embedder.linear_1/2`` on PixArt, each ``timestep_embedder`` elsewhere) and the
      layers projecting the embedding into the blocks (``*.time_emb_proj``, ``adaln_single.linear``, adaLN-zero
      ``norm1.linear``, ``norm_out.linear``, ``proj_out_1``). Their inputs take one value per timestep; on
      ``tiny-sd`` the projections' input also carries the pooled caption (diffusers' ``addition_embed_type
      "text"``), so their set is one value per timestep and calibration caption, pooled per timestep;
    - finite set calibration (``fsc``): each temporal layer input gets one activation grid per calibrated
      timestep, from that timestep's min-max (the paper's choice) or least-squared-error range; at inference
      the layer looks up the current timestep's grid through the step context, and at a timestep never
      calibrated (another step count or solver) the grid of the *nearest* calibrated timestep. ``fsc=off``
      gives them one static MSE grid like every other layer (the ablation);
    - temporal information aware reconstruction (``tiar``): the block's weights are reconstructed apart from
      the rest, in execution order, against the block's outputs — every projection's output and the embedding
      itself — on the whole finite set (every calibrated timestep, every calibration row), with the earlier
      temporal layers already quantized and the activations quantized by their FSC grids (rounding passed
      straight through). The embedding MLP's rounding is learned (AdaRound, ``iters``) through the real
      denoiser code, replayed at a one-pixel / one-patch sample and stopped after the last temporal layer; a
      projection's loss is its own output error from its input in the quantized block, evaluated exactly from
      second moments. The paper reconstructs the block jointly by gradient; here layer by layer (BRECQ order).
      ``tiar=false`` reconstructs them per layer like the rest (Q-Diffusion);
    - the rest of the network: Q-Diffusion (``qdiffusion``): MSE activation grids, MSE weight grids + AdaRound
      against each layer's quantized input, split quantization of U-Net skip concats.

    Input and output layers stay in float; attention matmuls are not quantized. Simulated: outputs are the
    integer model's, speed is not.
    """

    name = "tfmq"
    paper = TFMQ
    summary = "simulated low-bit PTQ: per-timestep grids and feature-aware reconstruction of the time embedding path"
    params = {
        **QDiffusion.params,
        "fsc": Param(str, "minmax", choices=("minmax", "mse", "off"),
                     help="per-timestep activation range of the temporal layers (off: one static grid)"),
        "tiar": Param(bool, True, help="reconstruct the temporal layers against the temporal features"),
    }

    def calibrate(self, pipe: Any) -> dict[str, LayerQuant]:
        v = self.values
        model = self.adapter.model
        times: dict[str, list[float]] = {}

        def record(name: str, module: nn.Module, x: torch.Tensor) -> None:
            if self.ctx.timestep is None:
                raise RecipeError(f"tfmq: {name} ran without a timestep; TFMQ needs the denoiser's timestep")
            times.setdefault(name, []).append(float(self.ctx.timestep))

        with Trajectory(model) as trajectory, LayerInputs(target_layers(self.adapter), record):
            layers, observers, order, splits = self.observe(pipe, keep_values=True, split=v["split"])
        temporal = temporal_layers(order)
        if not temporal:
            raise RecipeError(f"tfmq: {type(model).__name__} has no time embedding layer TFMQ knows "
                              f"(names containing {', '.join(EMBEDDERS + PROJECTIONS)})")
        acts = {n: static_activation(observers[n], v["abits"], "mse", 100.0) for n in order}
        if is_quantized(v["abits"]) and v["fsc"] != "off":
            acts.update({n: finite_set_grid(observers[n], times[n], v["abits"], v["fsc"]) for n in temporal})
        separate = v["tiar"] and is_quantized(v["wbits"])
        rest = [n for n in order if n not in temporal] if separate else order
        out = self.reconstruct(pipe, layers, observers, rest, splits, acts)
        self._temporal = {"temporal_layers": temporal, "timesteps": len(set(times[temporal[0]]))}
        if separate:
            out.update(self.tiar(model, layers, temporal, acts, trajectory.calls))
        return {n: out[n] for n in order}

    def tiar(self, model: nn.Module, layers: dict[str, nn.Module], temporal: list[str],
             acts: dict[str, dict[str, Any]], calls: list[Call]) -> dict[str, LayerQuant]:
        """Temporal information aware reconstruction of the temporal layers' weights (see the class docstring)."""
        wbits, iters = self.values["wbits"], self.values["iters"]
        replay = Replay(model, calls, layers[temporal[-1]])
        rows = len(replay.times)
        probes = {}
        for n in temporal:
            record = LayerQuant(list(layers[n].weight.shape), wbits, **acts[n])
            quantize = RowActivation(record, replay.times) if record.act_times is not None else (
                record.activation(False, self.ctx))
            probes[n] = ReplayLayer(n, layers[n], StraightThrough(quantize) if quantize is not None else None, rows)
        features = [probes[n] for n in temporal_features(temporal)]
        patches = PatchLog()
        frozen = [(p, p.requires_grad) for p in model.parameters()]
        out, errors = {}, []
        try:
            for p, _ in frozen:
                p.requires_grad_(False)
            for n in temporal:
                patches.attr(layers[n], "forward", probes[n])
            float_inputs = self._float_features(replay, probes)
            targets = {f.name: float_inputs[f.name][1] for f in features}
            embedders = [n for n in temporal if any(p in n for p in EMBEDDERS)]
            for n in temporal:
                probe, weight = probes[n], layers[n].weight.detach()
                grid, scale, zero = weight_grid(weight, wbits, "mse")
                if n in embedders:
                    loss: Any = FeatureLoss(replay, probe, features, targets)
                else:  # a projection: only its own output depends on it; its input comes from the quantized block
                    with torch.no_grad():
                        replay.run()
                    assert probe.input is not None
                    quantized = probe.activation(probe.input) if probe.activation is not None else probe.input
                    loss = Moments(layers[n], lambda _, q=quantized: q, rows, self.values["seed"])
                    loss.update(float_inputs[n][0])
                codes, nearest, learned = adaround(weight, grid, loss, iters)
                errors.append((n, nearest, learned))
                probe.weight = grid.dequantize(codes)
                out[n] = LayerQuant.from_codes(codes, scale, zero, [0, weight.shape[1]], wbits, False, **acts[n])
        finally:
            patches.restore()
            for p, flag in frozen:
                p.requires_grad_(flag)
        self._tiar_errors = errors
        return out

    @staticmethod
    def _float_features(replay: Replay, probes: dict[str, ReplayLayer]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Every temporal layer's input and output in the float model on the finite set."""
        saved = {n: p.activation for n, p in probes.items()}
        try:
            for p in probes.values():
                p.activation = None
            with torch.no_grad():
                replay.run()
            return {n: (p.input.detach(), p.output.detach()) for n, p in probes.items()  # type: ignore[union-attr]
                    if p.input is not None and p.output is not None}
        finally:
            for n, p in probes.items():
                p.activation = saved[n]

    def calibration_notes(self) -> dict[str, Any]:
        notes = {**super().calibration_notes(), **self._temporal, "fsc": self.values["fsc"]}
        errors = getattr(self, "_tiar_errors", [])
        if errors:
            notes["tiar_error_ratio"] = {n: round(learned / nearest, 4) if nearest > 0 else None
                                         for n, nearest, learned in errors}
        return notes

