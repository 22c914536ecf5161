"""What a generation costs: wall time, denoiser calls (NFE), FLOPs/MACs, peak memory.

Why each piece is written this way (see MEASURE.md):
- time is a warm median of >= 3 repetitions, optionally alternating baseline and variant so that
  drifting machine load hits both sides alike; speed-ups are ratios of such medians;
- NFE is counted with a forward pre-hook on the denoiser, so it counts what really ran;
- FLOPs come from ``torch.utils.flop_counter`` plus our own formula for CPU attention, which the
  stock counter leaves out (it has no formula for ``_scaled_dot_product_flash_attention_for_cpu``);
- peak memory on CPU is the resident-set high-water mark (tracemalloc does not see torch's allocator).
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from effdiff.patches import PatchLog

aten = torch.ops.aten


# ---------------------------------------------------------------- wall time


@dataclass
class Timing:
    """Seconds of each repetition; the median is the figure to quote."""

    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the repetitions were."""
        return (max(self.times) - min(self.times)) / self.median if self.median > 0 else 0.0


def _check_reps(reps: int) -> None:
    if reps < 3:
        raise ValueError(f"reps must be >= 3 (fewer is not a measurement), got {reps}")


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call, with the device synchronised before and after."""
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def time_call(fn: Callable[[], object], reps: int = 3, warmup: int = 1) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``reps`` timed times."""
    _check_reps(reps)
    for _ in range(warmup):
        fn()
    return Timing([timed(fn) for _ in range(reps)])


def time_alternating(
    baseline: Callable[[], object],
    variant: Callable[[], object],
    reps: int = 3,
    warmup: int = 1,
    enter_variant: Callable[[], object] | None = None,
    exit_variant: Callable[[], object] | None = None,
) -> tuple[Timing, Timing]:
    """Time baseline and variant in alternation (B V B V ...), both warmed up first.

    ``enter_variant`` / ``exit_variant`` switch an in-place patched pipeline between the two states
    (e.g. ``accelerate`` / ``remove``); the switch itself is not timed. The pipeline is left in the
    baseline state.
    """
    _check_reps(reps)
    enter = enter_variant or (lambda: None)
    leave = exit_variant or (lambda: None)
    for _ in range(warmup):
        baseline()
    enter()
    for _ in range(warmup):
        variant()
    leave()
    base_times, var_times = [], []
    for _ in range(reps):
        base_times.append(timed(baseline))
        enter()
        try:
            var_times.append(timed(variant))
        finally:
            leave()
    return Timing(base_times), Timing(var_times)


# ---------------------------------------------------------------- NFE and stage split


def find_denoiser(pipe) -> torch.nn.Module:
    """The module the pipeline calls once per step (``pipe.unet`` or ``pipe.transformer``, a compiled wrapper
    included: hooks on it see every call), unlike ``adapters.find_denoiser``, which unwraps to the model."""
    from effdiff.adapters import denoiser_attr

    return getattr(pipe, denoiser_attr(pipe))


class NFECounter:
    """Counts denoiser forward calls while active (a pre-hook sees every call, cached or not)."""

    def __init__(self, denoiser: torch.nn.Module) -> None:
        self.denoiser, self.calls, self._handle = denoiser, 0, None

    def _hook(self, module, args) -> None:
        self.calls += 1

    def __enter__(self) -> NFECounter:
        self.calls = 0
        self._handle = self.denoiser.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


@dataclass
class StageTimes:
    """Seconds spent in prompt encoding, the denoiser and VAE decode during one call."""

    encode: float = 0.0
    denoise: float = 0.0
    decode: float = 0.0
    total: float = 0.0

    @property
    def other(self) -> float:
        """Scheduler steps, guidance arithmetic, Python: the part no stage claims."""
        return max(0.0, self.total - self.encode - self.denoise - self.decode)


class StageTimer:
    """Splits a pipeline call's wall time into stages, with hooks that add microseconds.

    ``encode_prompt`` and ``vae.decode`` are wrapped on the instance and restored on exit; the
    denoiser gets pre/post forward hooks. Use it around one call; ``times`` holds the result.
    """

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.times = StageTimes()
        self._patches = PatchLog()
        self._t0 = 0.0
        self._denoise_start = 0.0

    def _wrap(self, owner, name: str, stage: str) -> None:
        original = getattr(owner, name, None)
        if original is None or not callable(original):
            return

        def wrapped(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                setattr(self.times, stage, getattr(self.times, stage) + time.perf_counter() - start)

        self._patches.attr(owner, name, wrapped)

    @torch.compiler.disable  # timing bookkeeping: never traced into a compiled denoiser's graph
    def _pre(self, module, args) -> None:
        self._denoise_start = time.perf_counter()

    @torch.compiler.disable
    def _post(self, module, args, output) -> None:
        self.times.denoise += time.perf_counter() - self._denoise_start

    def __enter__(self) -> StageTimer:
        self.times = StageTimes()
        self._wrap(self.pipe, "encode_prompt", "encode")
        vae = getattr(self.pipe, "vae", None)
        if vae is not None:
            self._wrap(vae, "decode", "decode")
        denoiser = find_denoiser(self.pipe)
        self._patches.hook(denoiser.register_forward_pre_hook(self._pre))
        self._patches.hook(denoiser.register_forward_hook(self._post))
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.times.total = time.perf_counter() - self._t0
        self._patches.restore()


# ---------------------------------------------------------------- FLOPs


SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def sdpa_arguments(args: tuple, kwargs: dict | None) -> dict:
    """``scaled_dot_product_attention``'s arguments by name, however the caller passed them (processors pass them
    by position, diffusers' attention dispatcher by keyword) — for the modes that intercept the call."""
    return dict(zip(SDPA_PARAMETERS, args, strict=False)) | dict(kwargs or {})


def attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """2·B·H·Lq·Lk·D for QKᵀ plus 2·B·H·Lq·Lk·Dv for PV (softmax not counted, as torch does)."""
    *batch, lq, d = query_shape
    lk = key_shape[-2]
    dv = value_shape[-1]
    bh = 1
    for b in batch:
        bh *= b
    return 2 * bh * lq * lk * d + 2 * bh * lq * lk * dv


def _cpu_attention_ops() -> list:
    ops = []
    for name in ("_scaled_dot_product_flash_attention_for_cpu",):
        op = getattr(aten, name, None)
        if op is not None:
            ops.append(op)
    return ops


@dataclass
class FlopCount:
    """FLOPs of one call; ``attention`` is the part our CPU-attention formula added."""

    flops: int
    attention: int
    by_op: dict[str, int] = field(default_factory=dict)
    by_root: dict[str, int] = field(default_factory=dict)  # per top-level module class: text encoder, denoiser, VAE

    @property
    def macs(self) -> int:
        return self.flops // 2


@contextmanager
def count_flops() -> Iterator[FlopCount]:
    """Count FLOPs of everything run inside; the yielded object is filled in on exit."""
    mapping = {op: attention_flops for op in _cpu_attention_ops()}
    result = FlopCount(0, 0)
    mode = FlopCounterMode(display=False, custom_mapping=mapping)
    with mode:
        yield result
    every = mode.get_flop_counts()
    counts = every.get("Global", {})
    result.by_root = {name: int(sum(ops.values())) for name, ops in every.items()
                      if "." not in name and name != "Global"}
    result.by_op = {str(k): int(v) for k, v in counts.items()}
    result.flops = int(mode.get_total_flops())
    cpu_names = {str(op) for op in _cpu_attention_ops()}
    result.attention = sum(v for k, v in result.by_op.items() if k in cpu_names)


def achieved_gflops(flops: int, seconds: float) -> float:
    """FLOPs actually executed per second, to hold against the dtype's peak."""
    return flops / seconds / 1e9 if seconds > 0 else float("nan")


# ---------------------------------------------------------------- peak memory


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Linux lets a process reset its own RSS high-water mark by writing 5 to clear_refs."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _ru_maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


@dataclass
class PeakMemory:
    """Peak memory of the process (CPU: RSS high-water mark) or device during a block, in bytes.

    Absolute, not the growth: the allocator keeps freed pages, so a warm call's growth is ~0 and says
    nothing; the absolute peak shows what a method adds (cached features, quantized copies) when
    baseline and variant run in the same process.
    """

    device: str = "cpu"
    peak_bytes: int = 0
    method: str = ""
    _start: int = 0
    _resettable: bool = False

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.method = "cuda max_memory_allocated"
            return self
        self._resettable = _reset_peak_rss() and _status_kib("VmHWM") is not None
        if self._resettable:
            self.method = "process RSS high-water mark (reset before the call)"
        else:  # ru_maxrss never decreases: only growth beyond the process's old peak is seen
            self._start = _ru_maxrss_bytes()
            self.method = "ru_maxrss delta (lower bound)"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()
        elif self._resettable:
            self.peak_bytes = (_status_kib("VmHWM") or 0) * 1024
        else:
            self.peak_bytes = max(0, _ru_maxrss_bytes() - self._start)


# ---------------------------------------------------------------- load from other processes


def _busy_seconds() -> float | None:
    """CPU seconds all cores spent busy since boot (Linux /proc/stat), or None where it cannot be read."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    ticks = [int(v) for v in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class ForeignLoad:
    """Cores kept busy by *other* processes while a block ran (MEASURE.md rule 8).

    The load average counts our own timed threads too, so on a 2-core machine a quiet bench already
    reads ≈ 2; subtracting this process's own CPU time from the machine's busy time leaves what
    competed with the measurement. ``cores`` is None where /proc/stat is missing (then ``loadavg``
    is all there is).
    """

    def __init__(self) -> None:
        self.cores: float | None = None
        self.loadavg: float | None = None
        self._start: tuple[float | None, float, float] = (None, 0.0, 0.0)

    def __enter__(self) -> ForeignLoad:
        times = os.times()
        self._start = (_busy_seconds(), times.user + times.system, time.perf_counter())
        return self

    def __exit__(self, *exc) -> None:
        busy0, own0, wall0 = self._start
        busy1, times, wall = _busy_seconds(), os.times(), time.perf_counter() - wall0
        own = times.user + times.system - own0
        if busy0 is not None and busy1 is not None and wall > 0:
            self.cores = max(0.0, (busy1 - busy0 - own) / wall)
        if hasattr(os, "getloadavg"):
            self.loadavg = os.getloadavg()[0]
