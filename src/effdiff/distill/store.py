"""Where distilled students live, and the command that makes one.

Beside the model: ``<model folder>/distill/<method>-lora/`` for a LoRA, ``<model folder>/distill/<method>/``
for a fully trained student. A bundled model's folder is the package's ``zoo/weights/<name>``, so the students
committed there ship with effdiff; a local model folder carries its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

RECORD = "effdiff_distill.json"
GUIDANCE_FILE = "guidance_embedding.safetensors"  # a guidance-distilled student's w embedding


def student_folder(method: str, form: str) -> str:
    return f"{method}-lora" if form == "lora" else method


def default_output(model: str, folder: str, kind: str = "distill") -> Path:
    """Beside the model: ``<bundled weights folder or model folder>/<kind>/<folder>`` (kind: distill or
    compress)."""
    from effdiff.zoo.load import BUNDLED, WEIGHTS

    base = WEIGHTS / model if model in BUNDLED else Path(model).expanduser()
    return base / kind / folder


def model_folder(pipe: Any) -> Path | None:
    """The folder a pipeline was loaded from (bundled or local effdiff model), if effdiff loaded it."""
    folder = getattr(pipe, "effdiff_model_folder", None)
    return Path(folder) if folder else None


def find_student(pipe: Any, method: str, form: str) -> Path | None:
    folder = model_folder(pipe)
    if folder is None:
        return None
    found = folder / "distill" / student_folder(method, form)
    return found if found.is_dir() else None


def model_reference(pipe: Any) -> str:
    """The pipeline's model as ``effdiff.load`` takes it (a bundled model by name, a local one by folder), for the
    command a refusal suggests."""
    return getattr(pipe, "effdiff_model_ref", None) or getattr(pipe, "effdiff_model_name", None) or "MODEL"


def given_folder(method: str, path: str, command: str) -> Path | None:
    """A recipe's ``path=`` as a folder (None when not given); refused when it is not one."""
    from effdiff.errors import RecipeError

    if not path:
        return None
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise RecipeError(f"{method}: path {str(folder)!r} is not a folder (one written by effdiff {command})")
    return folder


def make_command(pipe: Any, method: str, form: str) -> str:
    """The ``effdiff distill`` command that trains the missing student for this pipeline."""
    return f"effdiff distill {model_reference(pipe)} --method {method}" + (" --full" if form == "full" else "")
