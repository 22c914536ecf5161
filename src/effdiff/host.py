"""What the machine is, for every timing's record: CPU model and the SIMD extensions that decide kernel speed.

Hosts differ between sessions (AVX2-only vs AVX512-BF16/VNNI vs AMX), and int8, bf16 and training speeds differ
with them by up to 2×, so a number without them cannot be compared with another (MEASURE.md).
"""

from __future__ import annotations

import functools
import platform

# the extensions that change how fast effdiff's kernels run: int8 dot products (VNNI, AMX), bf16 (AVX512-BF16, AMX)
SIMD_FLAGS = ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


@functools.cache
def _cpuinfo_field(field: str) -> str:
    """One field of the first processor in /proc/cpuinfo (Linux), "" where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux; empty elsewhere)."""
    return frozenset(_cpuinfo_field("flags").split())


def simd() -> list[str]:
    """The ``SIMD_FLAGS`` this CPU has, in that order."""
    flags = cpu_flags()
    return [flag for flag in SIMD_FLAGS if flag in flags]


def cpu_description() -> str:
    """The CPU model and its SIMD extensions, e.g. "Intel(R) Xeon(R) Processor [avx2 avx512f … amx_bf16]"."""
    model = _cpuinfo_field("model name") or platform.processor() or platform.machine()
    return f"{model} [{' '.join(simd())}]"
