"""The one integer packer of both quantization packages: ``8 // bits`` codes per byte where ``bits`` divides 8.

Shared by the real weight-only int4 layers (``native/kernels.py``) and the simulated low-bit save format
(``lowbit/packed.py``), so an int4 weight is stored the same way wherever it comes from. The arithmetic
stays in 8/16-bit integers: a FLUX-size layer unpacked per call must not pass through int64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_byte(bits: int) -> int:
    return 8 // bits if 8 % bits == 0 else 1


def pack(codes: torch.Tensor, bits: int, qmin: int) -> torch.Tensor:
    """Integer codes in ``[qmin, qmin + 2**bits)`` -> flat uint8, low bits first."""
    unsigned = (codes.detach().flatten().to(torch.int16) - qmin).to(torch.uint8)
    n = per_byte(bits)
    unsigned = F.pad(unsigned, (0, (-unsigned.numel()) % n)).reshape(-1, n)
    out = unsigned[:, 0].clone()
    for i in range(1, n):
        out |= unsigned[:, i] << (i * bits)
    return out


def unpack(packed: torch.Tensor, bits: int, qmin: int, numel: int) -> torch.Tensor:
    """Inverse of ``pack``: the first ``numel`` codes as int16."""
    n, mask = per_byte(bits), (1 << bits) - 1
    parts = [(packed >> (i * bits)) & mask for i in range(n)]
    return torch.stack(parts, dim=-1).flatten()[:numel].to(torch.int16) + qmin
