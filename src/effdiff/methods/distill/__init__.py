"""Distillation level: methods that sample with a trained few-step student (``effdiff distill`` makes them)."""
