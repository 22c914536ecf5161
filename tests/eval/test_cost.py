import pytest
import torch
from diffusers.models.attention_processor import Attention

from effdiff.eval.cost import (
    NFECounter,
    PeakMemory,
    StageTimer,
    achieved_gflops,
    count_flops,
    find_denoiser,
    time_alternating,
    time_call,
)


def test_attention_flops_match_analytic_count():
    """Our CPU-attention formula fills the hole in torch's counter: total = linears + 4·B·H·Lq·Lk·D."""
    torch.manual_seed(0)
    b, lq, lk, dim, ctx, heads, head_dim = 2, 64, 10, 16, 12, 2, 8
    attn = Attention(query_dim=dim, cross_attention_dim=ctx, heads=heads, dim_head=head_dim).eval()
    x, text = torch.randn(b, lq, dim), torch.randn(b, lk, ctx)
    inner = heads * head_dim
    linears = 2 * b * (lq * dim * inner + 2 * lk * ctx * inner + lq * inner * dim)
    attention = 4 * b * heads * lq * lk * head_dim
    with torch.no_grad(), count_flops() as flops:
        attn(x, encoder_hidden_states=text)
    assert flops.attention == attention
    assert flops.flops == linears + attention
    assert flops.macs == flops.flops // 2


def test_attention_flops_with_different_value_width():
    q, k, v = torch.randn(1, 3, 20, 8), torch.randn(1, 3, 7, 8), torch.randn(1, 3, 7, 8)
    with count_flops() as flops:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert flops.flops == 2 * 3 * 20 * 7 * 8 * 2


class _Pipe:
    """Minimal pipeline: a denoiser called ``steps`` times, a text encoder, a VAE-like decode."""

    def __init__(self) -> None:
        self.unet = torch.nn.Linear(4, 4)
        self.vae = type("V", (), {"decode": staticmethod(lambda x: x * 2)})()

    def encode_prompt(self, p):
        return torch.zeros(1)

    def __call__(self, steps: int) -> torch.Tensor:
        self.encode_prompt("x")
        x = torch.zeros(1, 4)
        for _ in range(steps):
            x = self.unet(x)
        return self.vae.decode(x)


def test_nfe_counts_each_denoiser_call_and_detaches():
    pipe = _Pipe()
    with NFECounter(find_denoiser(pipe)) as nfe:
        pipe(7)
    assert nfe.calls == 7
    pipe(3)
    assert nfe.calls == 7  # hook removed on exit
    assert not pipe.unet._forward_pre_hooks


def test_stage_timer_splits_and_restores():
    pipe = _Pipe()
    original_decode = pipe.vae.decode
    with StageTimer(pipe) as timer:
        pipe(5)
    t = timer.times
    assert t.total > 0 and t.denoise > 0 and t.encode > 0 and t.decode > 0
    assert t.encode + t.denoise + t.decode <= t.total + 1e-6
    assert "encode_prompt" not in vars(pipe) and pipe.vae.decode is original_decode
    assert not pipe.unet._forward_hooks and not pipe.unet._forward_pre_hooks


def test_find_denoiser_error_names_the_class():
    with pytest.raises(ValueError, match="object has no denoiser at .unet or .transformer"):
        find_denoiser(object())


def test_timing_needs_three_reps_and_alternates():
    order = []
    with pytest.raises(ValueError, match=">= 3"):
        time_call(lambda: None, reps=2)
    base, var = time_alternating(lambda: order.append("b"), lambda: order.append("v"), reps=3, warmup=1,
                                 enter_variant=lambda: order.append("+"),
                                 exit_variant=lambda: order.append("-"))
    assert order == ["b", "+", "v", "-"] + ["b", "+", "v", "-"] * 3
    assert len(base.times) == len(var.times) == 3 and base.median >= 0


def test_peak_memory_sees_a_large_allocation():
    with PeakMemory("cpu") as mem:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB
        x += 1
        del x
    assert mem.peak_bytes >= 32 * 2**20, mem


def test_achieved_gflops():
    assert achieved_gflops(int(2e9), 2.0) == pytest.approx(1.0)


def test_peak_memory_is_absolute_and_seen_again_when_warm():
    """A warm allocator adds no RSS on a repeat, yet the peak must still be reported (not 0)."""
    x = torch.ones(16 * 2**20 // 4)
    del x
    with PeakMemory("cpu") as mem:
        y = torch.ones(16 * 2**20 // 4)
        del y
    assert mem.peak_bytes >= 16 * 2**20
