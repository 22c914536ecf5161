"""Where the token methods were measured to pay, so a method says at ``accelerate`` time when it will not.

Token reduction saves attention FLOPs and spends gathers, scatters and similarity maths; which side wins depends
on the device, the width and the tokens per block. Each row below is a committed measurement (speed-up of the
denoiser or the pipeline over the same model without the method, same process): the method, the device type, the
backbone kind, the image tokens per block at the first level it reduces, the speed-up, and where it came from.
``notice`` finds the row nearest to a model (same method and device type, same backbone kind where one exists;
tokens compared on a log scale) and, when that row lost, returns the sentence the method shows and warns with.
"""

from __future__ import annotations

import math
from typing import NamedTuple


class Measured(NamedTuple):
    method: str
    device: str
    kind: str
    tokens: int
    speedup: float
    where: str


ROWS = (
    # CPU (2-core AMD EPYC), benchmarks/results/tokens/breakeven.json: one denoiser call, CFG batch 2
    Measured("tome", "cpu", "unet", 1024, 1.13, "sd15-arch at 256 px (tokens_breakeven.py)"),
    Measured("tome", "cpu", "unet", 2304, 1.17, "sd15-arch at 384 px (tokens_breakeven.py)"),
    Measured("tome", "cpu", "unet", 4096, 1.17, "sd15-arch at 512 px (tokens_breakeven.py)"),
    Measured("tome", "cpu", "dit", 576, 1.24, "pixart-alpha-arch at 384 px (tokens_breakeven.py)"),
    Measured("tome", "cpu", "dit", 1024, 1.32, "pixart-alpha-arch at 512 px (tokens_breakeven.py)"),
    Measured("todo", "cpu", "unet", 4096, 1.20, "sd15-arch at 512 px, factor 2 (tokens_breakeven.py)"),
    Measured("atedm", "cpu", "unet", 1024, 1.12, "sd15-arch at 256 px (tokens_breakeven.py)"),
    Measured("atedm", "cpu", "unet", 4096, 0.92, "sd15-arch at 512 px (tokens_breakeven.py)"),
    Measured("atedm", "cpu", "dit", 576, 1.54, "pixart-alpha-arch at 384 px (tokens_breakeven.py)"),
    Measured("atedm", "cpu", "dit", 1024, 1.33, "pixart-alpha-arch at 512 px (tokens_breakeven.py)"),
    # CPU, whole pipeline on the bundled 32-px models (effdiff bench run 20261204-181735-bce64c)
    Measured("tome", "cpu", "unet", 256, 0.90, "tiny-sd, end to end (effdiff bench)"),
    Measured("tome", "cpu", "dit", 256, 0.78, "tiny-dit, end to end (effdiff bench)"),
    # NVIDIA H200, fp16, whole pipeline (the GPU measurements quoted in the GPU-kernels issue)
    Measured("tome", "cuda", "unet", 4096, 0.80, "SD 1.5 at 512 px, DDIM 50 + CFG, H200"),
    Measured("tome", "cuda", "dit", 4096, 0.66, "PixArt-XL-2 at 1024 px, DDIM 20 + CFG, H200"),
    Measured("toca", "cuda", "unet", 4096, 0.63, "SD 1.5 at 512 px, DDIM 50 + CFG, H200"),
    Measured("toca", "cuda", "dit", 4096, 0.71, "PixArt-XL-2 at 1024 px, DDIM 20 + CFG, H200"),
    Measured("atedm", "cuda", "unet", 4096, 0.40, "SD 1.5 at 512 px, DDIM 50 + CFG, H200"),
)


def nearest(method: str, device: str, kind: str, tokens: int) -> Measured | None:
    """The measurement closest to ``tokens`` for this method and device type (same backbone kind if any)."""
    rows = [r for r in ROWS if r.method == method and r.device == device]
    rows = [r for r in rows if r.kind == kind] or rows
    if not rows or tokens <= 0:
        return None
    return min(rows, key=lambda r: (abs(math.log(r.tokens / tokens)), -r.tokens))


def notice(method: str, device: str, kind: str, tokens: int) -> str | None:
    """A sentence saying the method is expected to slow this model down, or None where it was measured to pay
    (or was never measured near it)."""
    row = nearest(method, device, kind, tokens)
    if row is None or row.speedup >= 1.0:
        return None
    return (f"{method} was measured to slow down a {kind} with {row.tokens} tokens per block on {device} "
            f"({row.speedup:.2f}x, {row.where}); this model's blocks see {tokens} — expect no speed-up")
