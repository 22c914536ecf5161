"""Bundled methods; importing a subpackage registers its methods."""

from effdiff.methods import cache, solvers  # noqa: F401
