"""Timestep distillation: training few-step students of a model (``effdiff distill``). The methods that load
them onto a pipeline are in ``effdiff.methods.distill``."""
