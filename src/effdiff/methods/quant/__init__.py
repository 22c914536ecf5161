"""Quantization: real low-precision kernels (labelled by speed) and simulated low-bit PTQ/QAT methods."""

# importing registers the methods
from effdiff.methods.quant import (  # noqa: F401
    cast,
    efficientdm,
    int8,
    ptq,
    ptq4dit,
    ptqd,
    svdquant,
    tdq,
    tfmq,
    viditq,
)
