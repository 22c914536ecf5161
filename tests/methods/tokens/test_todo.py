"""ToDo: the downsampling is the grid operation it claims (every factor-th token, pooled cells), and a patched
self-attention computes exactly attention with full queries over keys/values projected from the downsampled
tokens — one fused call, fewer keys; levels below the factors and other streams are left alone."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_sd, sample
from diffusers.models.attention_processor import Attention

import effdiff
from effdiff.methods.tokens.todo import downsample_tokens


def grid_tokens(batch: int = 2, rows: int = 4, cols: int = 6, channels: int = 3) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(batch, rows * cols, channels)


def test_nearest_keeps_every_factor_th_token_and_pooling_averages_cells():
    tokens = grid_tokens()
    on_grid = tokens.view(2, 4, 6, 3)
    nearest = downsample_tokens(tokens, 4, 6, 2, "nearest")
    assert torch.equal(nearest, on_grid[:, ::2, ::2].reshape(2, 6, 3))
    pooled = downsample_tokens(tokens, 4, 6, 2, "avg_pool")
    cells = on_grid.view(2, 2, 2, 3, 2, 3).mean(dim=(2, 4)).reshape(2, 6, 3)
    assert torch.allclose(pooled, cells, atol=1e-6)
    ragged = downsample_tokens(grid_tokens(rows=5, cols=5), 5, 5, 2, "max_pool")
    assert ragged.shape == (2, 9, 3)  # a ragged edge pools what it has


def test_the_patched_attention_is_full_queries_over_downsampled_keys():
    from effdiff.methods.tokens.todo import ToDo

    torch.manual_seed(0)
    attention = Attention(query_dim=8, heads=2, dim_head=4).eval()
    tokens = torch.randn(2, 16, 8)
    small = downsample_tokens(tokens, 4, 4, 2, "nearest")
    q = attention.to_q(tokens).view(2, 16, 2, 4).transpose(1, 2)
    k = attention.to_k(small).view(2, 4, 2, 4).transpose(1, 2)
    v = attention.to_v(small).view(2, 4, 2, 4).transpose(1, 2)
    expected = attention.to_out[0](torch.nn.functional.scaled_dot_product_attention(q, k, v)
                                   .transpose(1, 2).reshape(2, 16, 8))
    method = ToDo(factor=2)
    method.latent, method.reduced_calls = (4, 4), 0

    class Block:  # what ``grid`` reads of a TokenBlock
        name, stride = "b", 1

    forward = method._downsampled_keys(Block(), 2, attention.forward)
    with torch.no_grad():
        assert torch.allclose(forward(tokens), expected, atol=1e-6)
    assert method.reduced_calls == 1


def test_keys_shrink_by_the_factor_squared_on_the_first_attention_level_only():
    pipe = make_tiny_sd()
    key_lengths: list[int] = []
    for name, module in pipe.unet.named_modules():
        if name.endswith("attn1.to_k"):
            module.register_forward_hook(lambda _m, args, _o: key_lengths.append(args[0].shape[1]))
    baseline = sample(pipe, steps=2)
    full = sorted(set(key_lengths))
    key_lengths.clear()
    effdiff.accelerate(pipe, "todo:factor=2")
    out = sample(pipe, steps=2)
    assert out.shape == baseline.shape and not torch.equal(out, baseline)
    assert sorted(set(key_lengths)) == sorted({full[-1] // 4, *full[:-1]})  # only the largest grid shrank
    pipe.effdiff.remove()
    assert torch.equal(sample(pipe, steps=2), baseline)


def test_bad_settings_are_refused():
    with pytest.raises(effdiff.RecipeError):
        effdiff.accelerate(make_tiny_sd(), "todo:factor=0")
    with pytest.raises(effdiff.RecipeError):
        effdiff.accelerate(make_tiny_sd(), "todo:mode=cubic")
