"""Quantization: real low-precision kernels (labelled by speed) and simulated low-bit PTQ/QAT methods."""

from effdiff.methods.quant import ptq, svdquant  # noqa: F401  (registers the simulated low-bit methods)
from effdiff.methods.quant import cast, int8  # noqa: F401  (registers the real-kernel methods)
