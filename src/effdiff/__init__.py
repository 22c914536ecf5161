"""effdiff: make diffusion pipelines fast and say, with numbers, what each speed-up costs.

Exports resolve lazily so ``import effdiff.cli`` starts fast and can set up logging before
diffusers and transformers are imported.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "EffdiffHandle": "effdiff.api", "accelerate": "effdiff.api", "is_accelerated": "effdiff.api",
    "RecipeError": "effdiff.recipe",
    "Method": "effdiff.registry", "Param": "effdiff.registry", "all_methods": "effdiff.registry",
    "get_method": "effdiff.registry", "load": "effdiff.zoo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'effdiff' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
