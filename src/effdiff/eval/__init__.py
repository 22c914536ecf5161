"""Metrics: cost (time, NFE, FLOPs, memory), fidelity,
distribution (FID/KID), prompt accuracy."""
