"""Tuned recipes saved under a name: ``effdiff.accelerate(pipe, "tuned:NAME")`` and ``--recipe tuned:NAME``.

A saved record keeps the recipe with what it was validated against — the model, the targets, the confirmation
run's numbers and its baseline's — so a reader of ``tuned:NAME`` can see why it was chosen. The records live in
effdiff's cache folder (``EFFDIFF_CACHE_DIR``, as the TeaCache calibrations the user makes), one JSON per name.
Core, not ``tune/``: ``recipe.parse`` reads them, and the core never imports what sits above the methods.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from effdiff.errors import RecipeError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def tuned_dir() -> Path:
    """Beside the user's AYS schedules and TeaCache calibrations: the one place effdiff keeps what it derived."""
    from effdiff.methods.solvers.schedule import cache_path

    return cache_path().parent / "tuned"


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name or ""):
        raise RecipeError(f"a tuned recipe's name is letters, digits, '_', '.' and '-' (at most 100), got {name!r}")
    return name


def save_tuned(name: str, record: dict[str, Any]) -> Path:
    """Write ``record`` (its ``recipe`` included) as ``tuned:name``; through a temporary file, so a kill never
    leaves half a record."""
    path = tuned_dir() / f"{check_name(name)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**record, "name": name}, indent=1, sort_keys=True))
    tmp.replace(path)
    return path


def saved_names() -> list[str]:
    folder = tuned_dir()
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def load_tuned(name: str) -> dict[str, Any]:
    """The record saved as ``tuned:name``, or a RecipeError naming the saved ones and how to make one."""
    path = tuned_dir() / f"{check_name(name)}.json"
    if not path.is_file():
        names = saved_names()
        have = f"saved: {', '.join(names)}" if names else f"none is saved in {tuned_dir()}"
        raise RecipeError(f"no tuned recipe {name!r} ({have}); make one with "
                          f"`effdiff tune --model M --target psnr>=30 --name {name}`")
    try:
        record = json.loads(path.read_text())
        recipe = record["recipe"]
    except (ValueError, KeyError, TypeError) as exc:
        raise RecipeError(f"{path} is not a tuned recipe ({exc})") from None
    if not isinstance(recipe, str) or recipe.lower().startswith("tuned:"):
        raise RecipeError(f"{path} holds no recipe to apply")
    return record
