"""Devices and links the plan prices kernels and collectives on, and the calibration of the two constants a
datasheet does not give: the fraction of peak a compute-bound eager kernel reaches, and the per-kernel floor
(host launch and framework overhead, which eager diffusers pays on every op).

Each kernel costs ``max(flops / (peak × efficiency), bytes / memory bandwidth, floor)`` — a roofline with a floor:
the host issues kernels at most one per ``floor``, and a kernel that is shorter still waits for the next launch.
The constants are fitted to measured single-device step times (``CALIBRATION``) and reused on every device of the
same software stack (an assumption the plan prints)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from effdiff.plan.trace import Kernel


@dataclass(frozen=True)
class Device:
    name: str
    peak_tflops: float  # dense fp16/bf16 tensor-core peak (datasheet)
    memory_tbps: float  # HBM bandwidth (datasheet)
    nvlink: str  # the NVLink generation its SXM boards carry


@dataclass(frozen=True)
class Link:
    name: str
    gbps: float  # all-gather bus bandwidth a rank sees (NCCL busbw, not the wire's peak)
    latency_us: float  # per ring step


DEVICES = {
    "a100": Device("A100-SXM4-80GB", 312.0, 2.04, "nvlink3"),
    "h100": Device("H100-SXM5-80GB", 989.0, 3.35, "nvlink4"),
    "h200": Device("H200-SXM-141GB", 989.0, 4.8, "nvlink4"),
}
LINKS = {
    "nvlink3": Link("NVLink 3 (NVSwitch)", 230.0, 10.0),
    "nvlink4": Link("NVLink 4 (NVSwitch)", 360.0, 10.0),
    "pcie4": Link("PCIe 4.0 x16", 20.0, 20.0),
    "pcie5": Link("PCIe 5.0 x16", 40.0, 20.0),
    "ethernet": Link("100 Gb Ethernet (RoCE)", 10.0, 30.0),
}


@dataclass(frozen=True)
class Measured:
    """One measured single-device step time: the model, image size, batch of one denoiser call, and where it
    was measured."""

    model: str
    px: int
    batch: int
    dtype: str
    seconds_per_step: float
    device: str
    source: str


CALIBRATION = (
    Measured("sd15-arch", 512, 2, "float16", 1.26 / 50, "h200",
             "SD 1.5 config, 512 px, 50 DDIM steps + CFG, fp16, eager: 1.26 s a generation (issue 16's H200 runs; "
             "text encoding and VAE decode included)"),
    Measured("flux-dev-arch", 1024, 1, "bfloat16", 4.94 / 28, "h200",
             "FLUX.1-dev config, 1024 px, 28 steps, bf16, eager: 4.94 s a generation (issue 16's H200 runs)"),
)


@dataclass(frozen=True)
class Constants:
    efficiency: float  # fraction of peak on compute-bound kernels
    floor_us: float  # per-kernel floor


def kernel_seconds(kernel: Kernel, device: Device, constants: Constants, share: int = 1) -> float:
    """One kernel's time when its work is split ``share`` ways (each rank computes 1/share of it)."""
    compute = kernel.flops / share / (device.peak_tflops * 1e12 * constants.efficiency)
    memory = kernel.bytes / share / (device.memory_tbps * 1e12)
    return max(compute, memory, constants.floor_us * 1e-6)


def call_seconds(kernels: Sequence[Kernel], device: Device, constants: Constants, share: int = 1) -> float:
    return sum(kernel_seconds(k, device, constants, share) for k in kernels)


def _floor_fitting(kernels: Sequence[Kernel], seconds: float, device: Device, efficiency: float) -> float:
    """The floor (µs) that makes ``kernels`` take ``seconds`` at ``efficiency`` (bisection: time grows with it)."""
    low, high = 0.0, seconds / max(len(kernels), 1) * 1e6
    for _ in range(60):
        middle = (low + high) / 2
        if call_seconds(kernels, device, Constants(efficiency, middle)) < seconds:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def calibrate(traces: Sequence[tuple[Measured, Sequence[Kernel]]]) -> tuple[Constants, list[float]]:
    """Constants fitting the measured step times: for each efficiency on a grid the floor fitting the first
    measurement, keeping the efficiency whose prediction of the others is closest (relative error); returns the
    constants and each measurement's relative error under them."""
    first, *others = traces
    best: tuple[float, Constants] | None = None
    for step in range(5, 101):
        efficiency = step / 100
        device = DEVICES[first[0].device]
        floor = _floor_fitting(first[1], first[0].seconds_per_step, device, efficiency)
        constants = Constants(efficiency, floor)
        error = sum(abs(call_seconds(k, DEVICES[m.device], constants) / m.seconds_per_step - 1) for m, k in others)
        if best is None or error < best[0]:
            best = (error, constants)
    assert best is not None
    constants = best[1]
    errors = [call_seconds(k, DEVICES[m.device], constants) / m.seconds_per_step - 1 for m, k in traces]
    return constants, errors
