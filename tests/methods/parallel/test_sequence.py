"""The pieces of sequence-parallel attention that need no ranks: the fused attention with its log-sum-exp equals the
written-out one, merging two key chunks' partial results by their log-sum-exps gives attention over both,
Ulysses' head split is as even as it goes, uneven stream shares add up per rank, a rank's rotary rows are its text
share's then its image share's, and the attention interception replaces exactly the SDPA calls it can split."""

import pytest
import torch
import torch.nn.functional as F

from effdiff import RecipeError
from effdiff.methods.parallel.sequence import (
    Mesh,
    WholeSequenceAttention,
    attention_with_lse,
    even_shares,
    rotary_rows,
    written_out_attention,
)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_the_fused_kernel_gives_the_written_out_attention_and_log_sum_exp(dtype, tol):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=generator).to(dtype) for n in (16, 24, 24))
    fused, fused_lse = attention_with_lse(q, k, v, 8 ** -0.5)
    written, written_lse = written_out_attention(q, k, v, 8 ** -0.5)
    assert fused.shape == (2, 3, 16, 8) and fused_lse.shape == (2, 3, 16, 1)
    assert torch.allclose(fused, written, atol=tol) and torch.allclose(fused_lse, written_lse, atol=tol)


def test_chunks_merged_by_their_log_sum_exps_are_attention_over_all_keys():
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, n, 4, generator=generator) for n in (5, 12, 12))
    (a, lse_a), (b, lse_b) = (attention_with_lse(q, k[:, :, s], v[:, :, s], 0.5) for s in (slice(0, 7), slice(7, 12)))
    lse = torch.logaddexp(lse_a, lse_b)
    merged = a * torch.exp(lse_a - lse) + b * torch.exp(lse_b - lse)
    whole = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.5)
    assert torch.allclose(merged, whole, atol=1e-6)


def test_heads_split_as_evenly_as_they_go():
    assert even_shares(16, 2) == [8, 8] and even_shares(3, 2) == [2, 1] and even_shares(5, 4) == [2, 1, 1, 1]


def _mesh(rank: int = 0, size: int = 1, **streams: list[int]) -> Mesh:
    return Mesh(ring=1, ulysses=size, rank=rank, ulysses_group=None, ring_group=None, streams=dict(streams))


def test_a_rank_holds_its_shares_of_every_stream():
    mesh = _mesh(1, 2, image=[3, 2], text=[2, 1])
    assert mesh.tokens(99) == [5, 3] and mesh.ulysses_tokens(99) == [5, 3] and mesh.ring_tokens(99) == [8]
    assert _mesh(0, 2).tokens(4) == [4, 4]  # nothing recorded: every rank holds what this one does


def test_rotary_rows_follow_the_text_and_image_shares():
    table = torch.arange(8.0)[:, None].expand(8, 2)  # rows: 3 text tokens, then 5 image tokens
    forward = rotary_rows(_mesh(1, 2, image=[3, 2], text=[2, 1]))(lambda: (table, table + 100))
    cos, sin = forward()
    assert cos[:, 0].tolist() == [2.0, 6.0, 7.0] and sin[:, 0].tolist() == [102.0, 106.0, 107.0]
    with pytest.raises(RecipeError, match="does not cover the 3 text and 6 image tokens"):
        rotary_rows(_mesh(0, 2, image=[3, 3], text=[2, 1]))(lambda: table)()


def test_the_interception_replaces_sdpa_and_refuses_what_it_cannot_split():
    q, k, v = (torch.randn(1, 2, 6, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
    with WholeSequenceAttention(_mesh(), "attn") as mode:
        out = F.scaled_dot_product_attention(query=q, key=k, value=v, scale=0.3)
        (q + 1).sum()  # other torch calls pass through
    assert mode.calls == 1 and torch.equal(out, F.scaled_dot_product_attention(q, k, v, scale=0.3))
    with pytest.raises(RecipeError, match="a mask, dropout, causality"), WholeSequenceAttention(_mesh(), "attn"):
        F.scaled_dot_product_attention(q, k, v, torch.ones(6, 6, dtype=torch.bool))
