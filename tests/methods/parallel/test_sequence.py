"""The pieces of sequence-parallel attention that need no ranks: the fused attention with its log-sum-exp equals the
written-out one, merging two key chunks' partial results by their log-sum-exps gives attention over both, and
Ulysses' head split is as even as it goes."""

import pytest
import torch

from effdiff.methods.parallel.sequence import attention_with_lse, head_counts, written_out_attention


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
    assert head_counts(16, 2) == [8, 8] and head_counts(3, 2) == [2, 1] and head_counts(5, 4) == [2, 1, 1, 1]
