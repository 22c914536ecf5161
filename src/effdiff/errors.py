"""The errors a user sees as one sentence. Imported by every layer, so it imports nothing of ours:
the adapters, the registry and the methods can all raise them without importing each other."""

from __future__ import annotations


class RecipeError(ValueError):
    """Any user mistake in a recipe (unknown method or parameter, incompatible stack). One sentence."""


class UnsupportedBackboneError(RecipeError):
    """The pipeline's denoiser (or one of its block classes) has no adapter."""
