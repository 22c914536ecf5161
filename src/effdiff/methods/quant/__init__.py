"""Quantization: real low-precision kernels (labelled by speed) and simulated low-bit PTQ/QAT methods."""

# importing registers the methods
import effdiff.methods.quant.tfmq  # noqa: F401
import effdiff.methods.quant.viditq  # noqa: F401
from effdiff.methods.quant import cast, efficientdm, int8, ptq, ptq4dit, ptqd, svdquant, tdq  # noqa: F401
