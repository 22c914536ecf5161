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


def write_plan(path: Path, method: str, recipe: str, decisions: list, measurements: list) -> int:
    """Write the layers torchao's kernel was put on (and every measurement) as JSON; returns the size in bytes."""
    import json
    from dataclasses import asdict

    path.parent.mkdir(parents=True, exist_ok=True)
    plan = {"format": "effdiff torchao plan", "method": method, "recipe": recipe,
            "layers": [d.name for d in decisions if d.quantize],
            "kept": {d.name: d.reason for d in decisions if not d.quantize},
            "measured": [{**asdict(m), "speedup": m.speedup} for m in measurements]}
    path.write_text(json.dumps(plan, indent=1))
    return path.stat().st_size


def read_plan(path: Path, method: str, model: nn.Module) -> list[str]:
    """The layer names of a plan written by ``write_plan`` for ``method``; refused for another method, a
    file of another kind, or a layer this denoiser does not have."""
    import json

    try:
        plan = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecipeError(f"{method}: {path} is not a torchao plan written by save() ({exc})") from None
    if plan.get("format") != "effdiff torchao plan" or plan.get("method") != method:
        raise RecipeError(f"{method}: {path} is not a {method} torchao plan (format {plan.get('format')!r}, method "
                          f"{plan.get('method')!r})")
    modules = dict(model.named_modules())
    unknown = [name for name in plan["layers"] if not isinstance(modules.get(name), nn.Linear)]
    if unknown:
        raise RecipeError(f"{method}: {path} quantizes {unknown[0]!r}, which is not a linear layer of this denoiser")
    return list(plan["layers"])
