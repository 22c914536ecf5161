"""A layer cache stacked after a token method whose token count changes over the steps (AT-EDM prunes nothing
in its early steps, then ``ratio``): a kept output of another count is recomputed, never served — the stack
``effdiff tune`` found crashing (``fora+atedm``, ``taylorseer+atedm``, ``toca+atedm``) runs, and each cache still
reuses work once the count settles."""

import pytest
import torch
from conftest import make_tiny, sample

from effdiff.api import accelerate

STEPS = 8


@pytest.mark.parametrize("kind", ["unet", "dit"])
@pytest.mark.parametrize("cache", ["fora:interval=3", "taylorseer:interval=3,warmup=1", "toca:interval=3"])
def test_a_layer_cache_runs_after_a_pruning_schedule(kind, cache):
    pipe = make_tiny(kind)
    accelerate(pipe, f"{cache}+atedm:ratio=0.5,early=0.5,max_downsample=2")
    images = sample(pipe, steps=STEPS)
    assert torch.isfinite(images).all()
    method = next(m for m in pipe.effdiff.methods if m.family == "cache")
    if cache.startswith("toca"):
        assert "merged or pruned by an earlier method" in method.describe()
    else:
        assert method.stats.cached > 0  # still serving from cache where the count held
