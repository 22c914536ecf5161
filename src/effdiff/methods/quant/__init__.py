"""Quantization: real low-precision kernels (labelled by speed) and simulated low-bit PTQ/QAT methods."""

from effdiff.methods.quant import cast, int8, ptq, svdquant  # noqa: F401  (importing registers the methods)
from effdiff.methods.quant import ptq4dit  # noqa: F401
from effdiff.methods.quant import tdq  # noqa: F401
from effdiff.methods.quant import ptqd  # noqa: F401
from effdiff.methods.quant import efficientdm  # noqa: F401
