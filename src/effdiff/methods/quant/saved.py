"""The one save format of both quantization packages: a safetensors file with an ``effdiff`` JSON header.

A real-kernel model (``native``: its whole state dict, integer codes stored as integers) and a simulated
low-bit calibration (``lowbit``: packed codes and grids per layer) differ in *what* they store, not in how:
both are tensors plus a header naming the format, the method and its settings, the weights' fingerprint where
known, and a per-layer table. One reader checks all of it and refuses a foreign or mismatched file with the
same sentences, whichever package wrote it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from effdiff.errors import RecipeError

FORMAT = "effdiff-quant-2"


def write(path: str | Path, tensors: dict[str, torch.Tensor], header: dict[str, Any]) -> int:
    """Write ``tensors`` (no shared storage, contiguous) and ``header`` (must name ``method``); returns bytes."""
    if "method" not in header:
        raise ValueError("a saved quantization header names its method")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    save_file(stored, str(path), metadata={"effdiff": json.dumps({"format": FORMAT, **header}, default=str)})
    return path.stat().st_size


def read(path: str | Path, method: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and header of a file ``write`` made for ``method``; anything else is a RecipeError saying why."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise RecipeError(f"{method}: no saved quantized model or calibration at {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get("effdiff")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a mapping)
    except Exception as exc:  # a corrupt or foreign file surfaces as several exception types
        raise RecipeError(f"{method}: {path} is not a readable safetensors file ({exc})") from None
    try:
        header = json.loads(raw) if raw else {}
    except ValueError:
        header = {}
    if header.get("format") != FORMAT:
        raise RecipeError(f"{method}: {path} was not written by effdiff's quantization save() "
                          f"(format {header.get('format')!r}, expected {FORMAT!r})")
    if header.get("method") != method:
        saved = header.get("method")
        raise RecipeError(f"{method}: {path} was saved by {saved}, not {method}; load it with {saved}")
    return tensors, header
