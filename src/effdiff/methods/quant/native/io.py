"""Save and reload a quantized denoiser in the quantization packages' one format (``quant/saved.py``).

The file holds the quantized model's whole state dict (codes, scales and biases of the integer layers; the
float tensors of every other layer) and, in its header, the recipe that made it and each integer layer's
class and constructor arguments. Reloading needs a denoiser of the same architecture (its own weights may be
anything: every tensor comes from the file) and rebuilds the kernels' packed weights from the codes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from effdiff.methods.quant import saved
from effdiff.methods.quant.native.kernels import LAYER_CLASSES
from effdiff.patches import PatchLog, split_name
from effdiff.registry import RecipeError


def write(path: Path, model: nn.Module, method: str, recipe: str, layers: dict[str, nn.Module]) -> int:
    """Write ``model``'s state dict and the layer table; returns the file size in bytes."""
    table = {name: {"class": type(layer).__name__, "init": layer.init_args()} for name, layer in layers.items()}
    return saved.write(path, model.state_dict(), {"method": method, "recipe": recipe, "layers": table})


def read(path: Path, method: str) -> tuple[dict[str, torch.Tensor], dict[str, tuple[type[nn.Module], dict[str, Any]]]]:
    """Tensors and ``{layer name: (class, init args)}`` of a file written by ``write`` for ``method``."""
    tensors, header = saved.read(path, method)
    layers = {}
    for name, entry in header["layers"].items():
        init = {k: tuple(v) if isinstance(v, list) else v for k, v in entry["init"].items()}
        layers[name] = (LAYER_CLASSES[entry["class"]], init)
    return tensors, layers


def load_float_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], quantized: set[str], swaps: PatchLog,
                       path: Path) -> None:
    """Swap every tensor outside the integer layers for the file's (originals kept in ``swaps``)."""
    expected = {k for k in model.state_dict() if not any(k.startswith(q + ".") for q in quantized)}
    present = {k for k in tensors if not any(k.startswith(q + ".") for q in quantized)}
    if expected != present:
        missing, extra = sorted(expected - present), sorted(present - expected)
        raise RecipeError(f"{path} does not match this denoiser: missing {missing[:3]}, unexpected {extra[:3]}")
    for key in sorted(expected):
        owner, attr = split_name(model, key)
        old = getattr(owner, attr)
        new = tensors[key].to(old.device)
        if new.shape != old.shape:
            raise RecipeError(f"{path} does not match this denoiser: {key} is {tuple(new.shape)} in the file, "
                              f"{tuple(old.shape)} here")
        if new.dtype != old.dtype:
            raise RecipeError(f"{path} was saved from a {new.dtype} model and this denoiser is {old.dtype}: stack "
                              f"the same cast as when it was saved (e.g. bf16+...:load=...)")
        swaps.tensor(owner, attr, nn.Parameter(new, requires_grad=False) if isinstance(old, nn.Parameter) else new)
