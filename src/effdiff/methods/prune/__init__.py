"""Compressed denoisers (``effdiff compress``) swapped into a pipeline."""
