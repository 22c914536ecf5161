"""LoRAs published for diffusers pipelines — LCM-LoRA's ``pytorch_lora_weights.safetensors`` and any LoRA in
diffusers', PEFT's or kohya's layout — read as effdiff's ``(down, up)`` deltas, so the distill family merges them
through the undo log exactly like the students ``effdiff distill`` writes.

Why not diffusers' ``load_lora_weights`` + ``fuse_lora``: fusing wraps every layer in a PEFT module and unfusing
subtracts the delta again, which leaves the weights off by rounding; a merge through the PatchLog puts the very
original tensors back. The *reading* stays diffusers' (the pipeline's ``lora_state_dict`` converts kohya's and
SGM's layouts), so every file diffusers reads, this reads. Each layer's scale — ``alpha / rank`` from the file's
alphas, PEFT's ``lora_alpha`` in its metadata, or 1 (diffusers' default when a file has neither) — is folded into
``up``, so the deltas merge at scale 1.
"""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path
from typing import Any

import torch

from effdiff.distill.lora import LoRAError

WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "lora.safetensors")
# the layer a key belongs to and whether it is the down (A) or up (B) factor, in the layouts diffusers produces
_FACTOR = (
    re.compile(r"^(?P<layer>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight$"),
    re.compile(r"^(?P<layer>.+)\.lora_(?P<role>A|B)(?:\.default)?\.weight$"),
    re.compile(r"^(?P<layer>.+)\.lora(?:_linear_layer)?\.(?P<role>down|up)\.weight$"),
)
_ROLES = {"A": "down", "B": "up", "down": "down", "up": "up"}


def is_published(path: Path) -> bool:
    """A LoRA file, or a folder holding one, that ``effdiff distill`` did not write (it writes a record)."""
    from effdiff.distill.store import RECORD

    if path.is_file():  # effdiff's own lora.safetensors is read through its folder, record and all
        return path.suffix == ".safetensors" and not (path.parent / RECORD).is_file()
    return path.is_dir() and not (path / RECORD).is_file() and _weight_file(path) is not None


def _weight_file(folder: Path) -> Path | None:
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    files = sorted(folder.glob("*.safetensors"))
    return files[0] if len(files) == 1 else None


def _layer_and_role(key: str) -> tuple[str, str] | None:
    for pattern in _FACTOR:
        match = pattern.match(key)
        if match:
            fields = match.groupdict()
            layer = fields["layer"]
            if "proj" in fields:  # attention-processor layout: to_out's linear is to_out.0
                layer = f"{layer}.{fields['proj']}" + (".0" if fields["proj"] == "to_out" else "")
            return layer, _ROLES[fields["role"]]
    return None


def _alpha_layer(key: str) -> str:
    """The layer an ``….alpha`` entry of a converted kohya file belongs to."""
    stem = key.removesuffix(".alpha")
    found = _layer_and_role(stem)
    return found[0] if found else stem


def _read(pipe: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, float], dict[str, Any]]:
    from diffusers import StableDiffusionPipeline

    reader = getattr(type(pipe), "lora_state_dict", None) or StableDiffusionPipeline.lora_state_dict
    source, weight_name = (path.parent, path.name) if path.is_file() else (path, _weight_file(path).name)
    extra: dict[str, Any] = {}
    unet = getattr(pipe, "unet", None)
    if unet is not None and hasattr(unet, "config"):
        extra["unet_config"] = unet.config  # maps SGM (original SDXL) block numbers to diffusers'
    if "return_alphas" in inspect.signature(reader).parameters:
        extra["return_alphas"] = True
    try:
        state, alphas, metadata = reader(str(source), weight_name=weight_name, local_files_only=True,
                                         return_lora_metadata=True, **extra)
    except (OSError, ValueError, KeyError) as exc:
        raise LoRAError(f"{path} is not a LoRA file diffusers can read ({exc})") from None
    return state, {key: float(value) for key, value in (alphas or {}).items()}, metadata or {}


def _peft_scale(layer: str, rank: int, metadata: dict[str, Any]) -> float | None:
    """``lora_alpha / r`` (or ``/ √r`` with rsLoRA) from PEFT's adapter metadata, a per-layer pattern first."""
    if "lora_alpha" not in metadata:
        return None
    alpha = float(metadata["lora_alpha"])
    for pattern, value in (metadata.get("alpha_pattern") or {}).items():
        if layer == pattern or layer.endswith(f".{pattern}"):
            alpha = float(value)
    return alpha / (math.sqrt(rank) if metadata.get("use_rslora") else rank)


def read_published(pipe: Any, path: Path, component: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``layer -> (down, up)`` for the pipeline's ``component`` (``unet`` or ``transformer``) from a published
    LoRA at ``path`` (a file or a folder holding one), each layer's scale folded into ``up``. Entries for other
    components (a text encoder's) are refused: applying half a LoRA would silently change what it does."""
    state, alphas, metadata = _read(pipe, path)
    prefix = f"{component}."
    others = sorted({key.split(".", 1)[0] for key in state if not key.startswith(prefix)})
    if others:
        raise LoRAError(f"{path} also changes {', '.join(others)} (effdiff merges a LoRA into the {component} "
                        "only); load it with the pipeline's load_lora_weights instead")
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        found = _layer_and_role(key.removeprefix(prefix))
        if found is None:
            raise LoRAError(f"{path}: {key!r} is not a LoRA down/up factor effdiff understands")
        factors.setdefault(found[0], {})[found[1]] = tensor
    layer_alphas = {_alpha_layer(key.removeprefix(prefix)): value for key, value in alphas.items()}
    # PEFT's adapter config, its keys prefixed with the component
    peft_metadata = {key.removeprefix(prefix): value for key, value in metadata.items()}
    deltas = {}
    for layer, pair in sorted(factors.items()):
        if set(pair) != {"down", "up"}:
            raise LoRAError(f"{path}: {layer!r} has only its {', '.join(pair)} factor")
        rank = pair["down"].shape[0]
        scale = layer_alphas[layer] / rank if layer in layer_alphas else _peft_scale(layer, rank, peft_metadata)
        scale = 1.0 if scale is None else scale
        deltas[layer] = (pair["down"].float(), pair["up"].float() * scale)
    if not deltas:
        raise LoRAError(f"{path} holds no LoRA factors")
    return deltas
