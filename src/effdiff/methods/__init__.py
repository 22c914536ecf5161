"""Bundled methods; importing a subpackage registers its methods."""

from effdiff.methods import cache, quant, solvers, tokens  # noqa: F401
