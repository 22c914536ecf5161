"""effdiff: make diffusion pipelines fast and say, with numbers, what each speed-up costs."""

from effdiff.api import EffdiffHandle, accelerate
from effdiff.recipe import RecipeError
from effdiff.registry import Method, Param, all_methods, get_method
from effdiff.zoo import load

__all__ = [
    "EffdiffHandle", "Method", "Param", "RecipeError", "accelerate", "all_methods", "get_method", "load",
]
