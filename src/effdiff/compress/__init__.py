"""Architecture compression: structural pruning to a MAC budget and finetuning (``effdiff compress``); the recipe
that swaps a compressed denoiser in is ``effdiff.methods.prune``."""
