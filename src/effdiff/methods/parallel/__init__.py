"""Parallel inference over ``torch.distributed``: one image's work split between processes (``effdiff.distributed``)."""
