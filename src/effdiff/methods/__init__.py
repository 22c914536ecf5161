"""Bundled methods; importing a subpackage registers its methods."""

from effdiff.methods import solvers  # noqa: F401
