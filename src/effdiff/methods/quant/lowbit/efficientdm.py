"""EfficientDM: data-free quantization-aware LoRA fine-tuning of a low-bit denoiser, distilled from itself."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from effdiff.context import StepContext
from effdiff.methods.quant.lowbit.base import QuantMethod
from effdiff.methods.quant.lowbit.fake import (
    BITS,
    FakeQuantLayer,
    Grid,
    StaticActivation,
    TemporalActivation,
    is_quantized,
    levels,
)
from effdiff.methods.quant.lowbit.packed import LayerQuant
from effdiff.methods.quant.lowbit.ptq import naive_layer
from effdiff.methods.quant.lowbit.qat import QALoRALayer
from effdiff.patches import PatchLog
from effdiff.recording import Call, Trajectory, first_tensor, tree_map
from effdiff.registry import Paper, Param

EFFICIENTDM = Paper("EfficientDM: Efficient Quantization-Aware Fine-Tuning of Low-Bit Diffusion Models", "2310.03270",
                    "ICLR 2024")
log = logging.getLogger(__name__)


def _rows(call: Call, index: torch.Tensor) -> tuple[tuple, dict[str, Any], torch.Tensor]:
    """The call restricted to batch rows ``index`` (every tensor whose first dim is the batch)."""
    batch = call.target.shape[0]

    def take(t: torch.Tensor) -> torch.Tensor:
        return t[index] if t.ndim and t.shape[0] == batch else t

    return tree_map(call.args, take), tree_map(call.kwargs, take), call.target[index]


class Distiller:
    """Fine-tunes the QALoRA layers so the quantized denoiser's outputs match the recorded float ones."""

    def __init__(self, model: nn.Module, calls: list[Call], layers: dict[str, QALoRALayer], rows: list[int]) -> None:
        self.model, self.calls, self.layers, self.rows = model, calls, layers, rows

    def _forward(self, i: int, index: torch.Tensor | None = None) -> torch.Tensor:
        call = self.calls[i]
        for layer in self.layers.values():
            layer.row = self.rows[i]
        if index is None:
            args, kwargs, target = call.args, call.kwargs, call.target
        else:
            args, kwargs, target = _rows(call, index)
        return F.mse_loss(first_tensor(self.model(*args, **kwargs)), target)

    @torch.no_grad()
    def loss(self) -> float:
        """Mean distillation loss over every recorded call (all rows)."""
        return sum(float(self._forward(i)) for i in range(len(self.calls))) / len(self.calls)

    def train(self, iters: int, batch: int, lr: float, lr_scale: float, seed: int) -> list[float]:
        """Adam with a linear decay to 0; each step one recorded call (one timestep), ``batch`` random rows."""
        lora = [p for q in self.layers.values() for p in q.lora]
        scales = [p for q in self.layers.values() for p in q.scales]
        groups = [g for g in ({"params": lora, "lr": lr}, {"params": scales, "lr": lr_scale}) if g["params"]]
        optimizer = torch.optim.Adam(groups)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1 - i / iters)
        generator = torch.Generator().manual_seed(seed)
        losses = []
        with torch.enable_grad():
            for step in range(iters):
                i = int(torch.randint(len(self.calls), (1,), generator=generator))
                size = self.calls[i].target.shape[0]
                index = torch.randperm(size, generator=generator)[:batch]
                loss = self._forward(i, index)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(float(loss.detach()))
                if (step + 1) % 100 == 0:
                    log.info("efficientdm: step %d/%d, loss %.5f", step + 1, iters, sum(losses[-100:]) / 100)
        return losses


class EfficientDM(QuantMethod):
    """EfficientDM (He et al., arXiv 2310.03270, ICLR 2024): QALoRA fine-tuning distilled from the float model.

    1. Initialisation: naive PTQ grids (``ptq``'s per-channel weight / per-tensor activation grids, by least
       squared error with ``range=mse``) from one float sampling run over ``prompts`` calibration prompts.
    2. Data: that same run records every denoiser call — the inputs ``(x_t, t, condition)`` along the float
       model's own sampling trajectory and its output, the target. No training data is used (data-free).
    3. QALoRA: every quantized Linear / Conv2d gets a rank-``rank`` LoRA added to its float weight *before*
       quantization (``Q(W + s0 * B A)``), so after training it merges into the integer codes at no inference
       cost; the product is in units of the initial weight step (scale-aware LoRA optimisation). Weight steps
       are learned too (LSQ), zero points stay the PTQ integers; rounding uses the straight-through estimator.
    4. TALSQ (``talsq=true``): one learned activation step size per layer *and per calibration timestep*
       (LSQ), initialised from the shared PTQ grid; ``talsq=false`` learns one step per layer.
    5. Distillation: ``iters`` Adam steps (linear decay), each on one recorded call (one timestep) and
       ``batch`` random rows of it, minimising the MSE between the quantized and the float outputs. The
       paper regresses the guided noise estimate; here both CFG halves are regressed (a stronger target).

    Storage: per layer the merged integer codes and learned grids (``LayerQuant``, counted like ``ptq``);
    with TALSQ the stored grid is the geometric mean of the layer's per-timestep steps and the per-timestep
    table (``timesteps`` x layer steps) travels in the calibration's info JSON (saved and reloaded with it,
    counted in ``size``). At inference each layer uses the row of the calibration timestep nearest the
    current one. The trained forward and the stored integer model compute the same values bit for bit.
    Input and output layers stay in float; attention matmuls are not quantized. Simulated (no low-bit kernel).
    """

    name = "efficientdm"
    paper = EFFICIENTDM
    summary = "simulated low-bit QAT: quantization-aware LoRA + per-timestep LSQ, distilled from the float model"
    params = {
        **QuantMethod.common,
        "wbits": Param(int, 4, choices=BITS, help="weight bits; 16 or 32 keep weights in float"),
        "abits": Param(int, 4, choices=BITS, help="activation bits; 16 or 32 keep activations in float"),
        "prompts": Param(int, 8, 1, 256, help="calibration prompts (their sampling run is the training data)"),
        "rank": Param(int, 8, 1, 256, help="LoRA rank per layer"),
        "iters": Param(int, 400, 0, 100_000, help="fine-tuning steps (0: the PTQ initialisation)"),
        "batch": Param(int, 8, 1, 4096, help="rows of one recorded denoiser call per step"),
        "lr": Param(float, 2e-3, 0.0, 1.0, help="Adam learning rate of the LoRA factors (in weight-step units)"),
        "lr_scale": Param(float, 1e-2, 0.0, 1.0, help="Adam learning rate of the log step sizes"),
        "range": Param(str, "mse", choices=("minmax", "mse"), help="how the initial PTQ grids cover the values"),
        "talsq": Param(bool, True, help="one activation step size per timestep (else one per layer)"),
    }

    def calibrate(self, pipe: Any) -> dict[str, LayerQuant]:
        v = self.values
        model = self.adapter.model
        with Trajectory(model) as trajectory:
            layers, observers, order, _ = self.observe(pipe, keep_values=v["range"] != "minmax")
        inits = {n: naive_layer(layers[n], observers[n], v["wbits"], v["abits"], v["range"], 100.0) for n in order}
        self._notes: dict[str, Any] = {"kept_float": self._kept_float, "iters": 0}
        if not (is_quantized(v["wbits"]) or is_quantized(v["abits"])) or v["iters"] == 0:
            return inits
        timesteps = trajectory.timesteps() if v["talsq"] else [0.0]
        rows = [timesteps.index(c.timestep) if v["talsq"] else 0 for c in trajectory.calls]
        generator = torch.Generator().manual_seed(v["seed"])
        qalora = {n: QALoRALayer(layers[n], inits[n], v["rank"], len(timesteps), generator) for n in order}
        distiller = Distiller(model, trajectory.calls, qalora, rows)
        patches = PatchLog()
        frozen = [(p, p.requires_grad) for p in model.parameters()]
        try:
            for p, _ in frozen:
                p.requires_grad_(False)
            for n in order:
                patches.attr(layers[n], "forward", qalora[n])
            before = distiller.loss()
            start = time.perf_counter()
            losses = distiller.train(v["iters"], v["batch"], v["lr"], v["lr_scale"], v["seed"])
            seconds = time.perf_counter() - start
            after = distiller.loss()
        finally:
            patches.restore()
            for p, flag in frozen:
                p.requires_grad_(flag)
        self._notes.update(iters=v["iters"], train_s=round(seconds, 3), distill_loss_ptq=before,
                           distill_loss_trained=after, loss_first=losses[0], loss_last=losses[-1],
                           recorded_calls=len(trajectory.calls))
        if v["talsq"] and is_quantized(v["abits"]):
            self._notes["talsq"] = {"timesteps": timesteps, "steps": {n: qalora[n].act_table() for n in order}}
        return {n: qalora[n].record(None if v["talsq"] else 0) for n in order}

    def calibration_notes(self) -> dict[str, Any]:
        return self._notes

    def make_layer(self, name: str, record: LayerQuant, module: nn.Module, ctx: StepContext) -> FakeQuantLayer:
        """With TALSQ, the layer's activation grid follows the nearest calibrated timestep's learned steps."""
        layer = super().make_layer(name, record, module, ctx)
        table = self.info.get("talsq")
        if table:
            grids = [_static(record, steps, layer.conv) for steps in table["steps"][name]]
            layer.activation = TemporalActivation(ctx, table["timesteps"], grids, layer.activation)
        return layer

    def size(self) -> dict[str, int]:
        """Stored bytes, the per-timestep activation table (float32) included."""
        size = super().size()
        table = self.info.get("talsq")
        if table:
            extra = 4 * sum(len(row) for steps in table["steps"].values() for row in steps)
            size = {**size, "bytes": size["bytes"] + extra, "records_bytes": size["records_bytes"] + extra}
        return size


def _static(record: LayerQuant, steps: list[float], conv: bool) -> StaticActivation:
    """The static grid of ``record`` with the activation steps of one timestep."""
    assert record.act_zero is not None
    qmin, qmax = levels(record.abits, False)
    return StaticActivation(Grid(torch.tensor(steps, dtype=torch.float32), record.act_zero.float(), qmin, qmax),
                            record.act_segments, conv)
