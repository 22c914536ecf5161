"""Real low-precision kernels: casts (bf16/fp16), int8 dynamic and weight-only int8/int4 layers."""
