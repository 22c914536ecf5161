"""Feature caching: reuse (or forecast) denoiser features across steps, on U-Nets, DiTs and MMDiTs alike."""
