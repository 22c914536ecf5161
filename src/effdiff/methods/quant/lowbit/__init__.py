"""Calibrated low-bit methods (PTQ and QAT), simulated with fake quantization unless a real kernel exists."""
