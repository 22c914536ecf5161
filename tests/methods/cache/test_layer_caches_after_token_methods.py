"""A cache stacked after a token method whose token count changes over the steps (AT-EDM prunes nothing in its
early steps, then ``ratio``): a kept output of another count is recomputed, never served — the stacks ``effdiff
tune`` found crashing (layer caches ``fora``, ``taylorseer``, ``toca``; segment caches ``deltadit``,
``taylorseer-blocks`` on a DiT) run, and each cache still reuses work once the count settles. A segment cache
goes outside AT-EDM's spans whatever the written order, so a skipped segment never leaves a span half pruned."""

import pytest
import torch
from conftest import make_tiny, make_tiny_dit, sample

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


@pytest.mark.parametrize("cache", ["deltadit:interval=2", "taylorseer-blocks:interval=3,warmup=1",
                                   "fbcache:threshold=0.5"])
def test_a_segment_cache_runs_after_a_pruning_schedule(cache):
    pipe = make_tiny("dit")
    accelerate(pipe, f"{cache}+atedm:ratio=0.5,early=0.5,span=2")
    assert torch.isfinite(sample(pipe, steps=STEPS)).all()
    assert next(m for m in pipe.effdiff.methods if m.family == "cache").stats.cached > 0


@pytest.mark.parametrize("cache", ["fbcache:threshold=0.5", "teacache:threshold=0.5", "deltadit:interval=2"])
@pytest.mark.parametrize("cache_first", [True, False])
def test_a_segment_cache_skips_whole_pruning_spans_in_either_written_order(cache, cache_first):
    # four blocks, spans of two: the segment [1, 4) holds a span's last block and the whole next span
    pipe = make_tiny_dit(num_layers=4)
    pruning = "atedm:ratio=0.5,early=0,span=2"
    accelerate(pipe, f"{cache}+{pruning}" if cache_first else f"{pruning}+{cache}")
    assert [m.family for m in pipe.effdiff.methods] == ["tokens", "cache"]
    images = sample(pipe, steps=STEPS)
    assert images.shape == (1, 1, 8, 8) and torch.isfinite(images).all()
    assert pipe.effdiff.methods[1].stats.cached > 0
