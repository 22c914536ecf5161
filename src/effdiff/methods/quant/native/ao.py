"""torchao's low-precision kernels on the denoiser's layers, each layer's fate measured on the device it runs on.

Why torchao and not our own GEMMs: its float8 (``torch._scaled_mm``, cuBLASLt), int8 (``torch._int_mm``) and int4
(tinygemm / mslk) tensor subclasses are the kernels the field measures against (1.54× on FLUX.1-dev with float8 on
an H100), they compose with ``torch.compile`` (where they are fastest) and with effdiff's hooks, because a
quantized layer is still an ``nn.Linear`` whose weight is a tensor subclass.

Why measure each layer: a low-precision GEMM pays only where the matmul is large enough to hide the activation's
quantization per call. Which layers those are depends on the GPU, the dtype, the batch and the resolution — so
``measured_plan`` records every candidate layer's real input during one call of the pipeline's denoiser, then times
that layer in float and quantized on that input (median of ``reps``, synchronised) and checks its output error;
a layer is quantized only where it is at least ``min_speedup``× faster and its relative error is under ``max_error``.
The timing costs one forward per layer and a few per candidate, seconds on a GPU.

Layers are quantized as copies put in through the undo log (``torchao.quantization.quantize_`` changes a module in
place), so ``remove()`` gives back the very float layers.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

KINDS = ("int8", "int8wo", "int4wo", "fp8")


def available() -> bool:
    try:
        import torchao.quantization  # noqa: F401
    except ImportError:
        return False
    return True


def unsupported(kind: str, device: torch.device) -> str | None:
    """Why torchao's ``kind`` kernel cannot run on ``device`` (None: it can)."""
    if not available():
        return "torchao is not installed (pip install torchao)"
    if kind == "fp8":
        if device.type != "cuda":
            return f"float8 matmuls need an NVIDIA GPU of compute capability >= 8.9; the denoiser is on {device.type}"
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return (f"float8 matmuls need compute capability >= 8.9 (Ada, Hopper, Blackwell); "
                    f"{torch.cuda.get_device_name(device)} is {major}.{minor}")
    if kind == "int4wo" and device.type != "cuda":
        return f"torchao's int4 weight-only kernel (tinygemm/mslk) runs on CUDA; the denoiser is on {device.type}"
    return None


def config(kind: str, group: int = 128) -> Any:
    """The torchao ``quantize_`` config of ``kind``: float8 per-row dynamic activations × float8 weights, int8
    dynamic activations × int8 weights, int8 or int4 (groups of ``group``) weight-only."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        PerRow,
    )

    return {"fp8": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
            "int8": Int8DynamicActivationInt8WeightConfig,
            "int8wo": Int8WeightOnlyConfig,
            "int4wo": lambda: Int4WeightOnlyConfig(group_size=group)}[kind]()


def quantized_copy(layer: nn.Linear, settings: Any) -> nn.Linear:
    """A copy of ``layer`` with torchao's quantized weight (the original is not touched)."""
    from torchao.quantization import quantize_

    twin = copy.deepcopy(layer)
    quantize_(twin, settings)
    return twin


@dataclass(frozen=True)
class Measured:
    """One candidate layer on its recorded input: float and quantized seconds, and the quantized output's error
    relative to the float output's norm."""

    name: str
    float_s: float
    quantized_s: float
    error: float

    @property
    def speedup(self) -> float:
        return self.float_s / self.quantized_s


def record_inputs(model: nn.Module, names: list[str], call: Callable[[], Any]) -> dict[str, torch.Tensor]:
    """The input of each named layer during one ``call`` (its first call in it)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda _m, args, name=name: seen.setdefault(name, args[0].detach())) for name in names]
    try:
        with torch.no_grad():
            call()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def seconds(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    """Median wall seconds of ``fn`` after one warm-up, synchronised on CUDA."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = []
    with torch.no_grad():
        fn()
        for _ in range(reps):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(layer: nn.Linear, twin: nn.Linear, x: torch.Tensor, name: str, reps: int) -> Measured:
    with torch.no_grad():
        reference, approx = layer(x), twin(x)
    error = ((approx.float() - reference.float()).norm() / reference.float().norm().clamp(min=1e-12)).item()
    return Measured(name, seconds(lambda: layer(x), x.device, reps), seconds(lambda: twin(x), x.device, reps), error)


def kernel_copy(layer: nn.Linear, settings: Any) -> tuple[nn.Linear | None, str]:
    """(quantized copy, "") or (None, why torchao refused this layer's shape)."""
    try:
        return quantized_copy(layer, settings), ""
    except (RuntimeError, ValueError, AssertionError, NotImplementedError) as exc:
        return None, f"torchao's kernel refused the shape ({type(exc).__name__})"


def measured_plan(model: nn.Module, names: list[str], settings: Any, call: Callable[[], Any], min_speedup: float,
                  max_error: float, reps: int = 5) -> tuple[dict[str, nn.Linear], dict[str, str], list[Measured]]:
    """The quantized copies of the candidate layers that win on this device ({name: copy}), why each other
    candidate stays float ({name: reason}), and every measurement. A layer ``call`` never reaches stays float."""
    inputs = record_inputs(model, names, call)
    chosen, kept, measured = {}, {}, []
    for name in names:
        if name not in inputs:
            kept[name] = "not called"
            continue
        layer = model.get_submodule(name)
        twin, refusal = kernel_copy(layer, settings)
        if twin is None:
            kept[name] = refusal
            continue
        result = measure(layer, twin, inputs[name], name, reps)
        measured.append(result)
        if result.speedup < min_speedup:
            kept[name] = f"measured under {min_speedup:g}x"
        elif result.error > max_error:
            kept[name] = f"relative error over {max_error:g}"
        else:
            chosen[name] = twin
    return chosen, kept, measured
