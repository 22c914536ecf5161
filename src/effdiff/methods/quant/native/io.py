"""Save and reload a quantized denoiser: one safetensors file, integer codes stored as integers.

The file holds the quantized model's whole state dict (codes, scales and biases of the integer layers; the
float tensors of every other layer) and, in its metadata, the recipe that made it and each integer layer's
class and constructor arguments. Reloading needs a denoiser of the same architecture (its own weights may be
anything: every tensor comes from the file) and rebuilds the kernels' packed weights from the codes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from effdiff.methods.quant.native.kernels import LAYER_CLASSES
from effdiff.patches import PatchLog, split_name
from effdiff.registry import RecipeError

FORMAT = "effdiff-quant-1"


def write(path: Path, model: nn.Module, recipe: str, layers: dict[str, nn.Module]) -> int:
    """Write ``model``'s state dict and the layer table; returns the file size in bytes."""
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}  # clone: no shared storage
    table = {name: {"class": type(layer).__name__, "init": layer.init_args()} for name, layer in layers.items()}
    meta = {"format": FORMAT, "recipe": recipe, "layers": json.dumps(table)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)
    return path.stat().st_size


def read(path: Path, method: str) -> tuple[dict[str, torch.Tensor], dict[str, tuple[type[nn.Module], dict[str, Any]]]]:
    """Tensors and ``{layer name: (class, init args)}`` of a file written by ``write`` for ``method``."""
    if not path.is_file():
        raise RecipeError(f"{method}: no quantized model at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except Exception as exc:  # a corrupt or foreign file surfaces as several exception types
        raise RecipeError(f"{method}: {path} is not a readable safetensors file ({exc})") from None
    if meta.get("format") != FORMAT:
        raise RecipeError(f"{method}: {path} was not written by effdiff's quantization save()")
    saved = meta["recipe"].partition(":")[0]
    if saved != method:
        raise RecipeError(f"{method}: {path} holds a {saved} model; load it with {saved}:load=...")
    layers = {}
    for name, entry in json.loads(meta["layers"]).items():
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
