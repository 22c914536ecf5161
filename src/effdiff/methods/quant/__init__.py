"""Quantization: real low-precision kernels (labelled by speed) and simulated low-bit PTQ/QAT methods."""
