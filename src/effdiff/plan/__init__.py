"""``effdiff plan``: what a parallel method would do on hardware we cannot reach — a cost model of compute per
rank, bytes communicated per step and their overlap, from the denoiser's own kernels (traced on the meta device at
the requested size) and device constants calibrated with measured single-device timings."""
