"""Argument and output-path checks shared by ``effdiff bench`` / ``generate`` / ``report`` and ``run_bench``.

Why a module of its own: every check must run before any model loads, any run is registered or any
file is written (a user who typed ``--steps 0`` should not wait for a model and then read a
ZeroDivisionError), and the CLI and the Python API must refuse the same values with the same sentence.
Each check raises ``ValueError`` with one sentence; the CLI turns that into exit status 2.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

MAX_STEPS = 1000  # the bundled and stock schedules have 1,000 training timesteps; DDIM cannot take more steps
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def steps(value: int, name: str = "--steps") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_STEPS:
        raise ValueError(f"{name} must be a whole number from 1 to {MAX_STEPS} (denoising steps), got {value!r}")
    return value


def guidance(value: float, name: str = "--guidance") -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (the classifier-free guidance scale; <= 1 turns "
                         f"guidance off), got {value!r}")
    return float(value)


def at_least(value: int, low: int, name: str, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be a whole number >= {low} ({what}), got {value!r}")
    return value


def seed(value: int, name: str = "--seed") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise ValueError(f"{name} must be a whole number from 0 to 2**63 - 1, got {value!r}")
    return value


def _first_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path.cwd()


def _writable_folder(folder: Path, what: str, shown: Path) -> None:
    """``folder`` is, or can be created as, a folder this process may write into."""
    existing = _first_existing(folder)
    if not existing.is_dir():
        raise ValueError(f"cannot write {what} {shown}: {existing} exists and is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {what} {shown}: {existing} is not writable")


def output_dir(path: str | Path, name: str = "--out") -> Path:
    """A results folder that exists or can be made; nothing is created here."""
    if str(path).strip() == "":
        raise ValueError(f"{name} must name a folder, got an empty path")
    path = Path(path).expanduser()
    _writable_folder(path, f"to the {name} folder", path)
    return path


def output_file(path: str | Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES, name: str = "--out") -> Path:
    """A file path whose folder is writable (or creatable), that is not a folder, with a known suffix."""
    if str(path).strip() == "":
        raise ValueError(f"{name} must name a file, got an empty path")
    path = Path(path).expanduser()
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"{name} {path} must end in one of {', '.join(suffixes)}")
    if path.is_dir():
        raise ValueError(f"cannot write {path}: it is a folder")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"cannot write {path}: the file exists and is not writable")
    _writable_folder(path.parent, "the file", path)
    return path


def os_error_sentence(exc: OSError) -> str:
    """An OSError met while writing an output, as one sentence that names the path."""
    where = exc.filename if exc.filename is not None else "an output path"
    return f"cannot write {where}: {exc.strerror or exc}"
