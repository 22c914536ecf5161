"""``distrifusion`` on two gloo ranks started here, each holding half of the image (rows of a U-Net's latent, half
of a DiT's tokens). With fresh activations every step (``exchange=sync``) the image is the single-process one up to
float rounding; DistriFusion proper (``stale``) is bit for bit that through its synchronous warm-up and then within
a small distance of it, while the naive patch split (``none``) strays further — the paper's ordering. Both ranks
end every step with the whole latent; ``remove()`` gives back the single-process images bit for bit. Refusals:
no process group, a feature-driven cache or token method beside it, an architecture without a patch split, a
latent that does not split into patches."""

from __future__ import annotations

import pytest
import torch
from _ranks import on_ranks
from _stock import build, generate
from conftest import denoiser, make_tiny_dit, make_tiny_sd, sample
from torch import nn

import effdiff
from effdiff import RecipeError
from effdiff.methods.parallel.exchange import Exchange
from effdiff.methods.parallel.patch_layers import conv_with_halo, halo_rows

STEPS = 8


def _cases(kind: str, make) -> dict:
    from effdiff.plan.estimate import distrifusion_parts
    from effdiff.plan.trace import trace_call

    pipe = make()
    calls = []
    handle = denoiser(pipe).register_forward_pre_hook(lambda _m, a, k: calls.append((a, k)), with_kwargs=True)
    single = sample(pipe, steps=STEPS)
    handle.remove()
    per_step = sum(distrifusion_parts(trace_call(denoiser(pipe), calls[0][1], calls[0][0]), 2))
    out: dict = {"planned": (STEPS + 3) * per_step}
    for recipe in ("distrifusion:exchange=sync", "distrifusion:warmup=2", "distrifusion:exchange=none"):
        effdiff.accelerate(pipe, recipe)
        image = sample(pipe, steps=STEPS)
        early = sample(pipe, steps=3)  # only warm-up steps (the first + 2)
        out[recipe] = {"diff": float((image - single).abs().max()), "sent": pipe.effdiff.methods[0].sent_bytes,
                       "checksum": float(image.double().sum()), "early": early}
        pipe.effdiff.remove()
    out["restored"] = bool(torch.equal(sample(pipe, steps=STEPS), single))
    out["early_single"] = sample(pipe, steps=3)
    cache = "deepcache:interval=2" if kind == "sd" else "fora:interval=2"
    effdiff.accelerate(pipe, cache)
    cached = sample(pipe, steps=STEPS)
    pipe.effdiff.remove()
    effdiff.accelerate(pipe, f"distrifusion:exchange=sync+{cache}")
    out["cache_diff"] = float((sample(pipe, steps=STEPS) - cached).abs().max())
    pipe.effdiff.remove()
    return out


def _refusals() -> dict:
    refused = {}
    for name, recipe in (("fbcache", "distrifusion+fbcache"), ("tome", "distrifusion+tome")):
        try:
            effdiff.accelerate(make_tiny_sd(), recipe)
        except RecipeError as exc:
            refused[name] = str(exc)
    try:
        effdiff.accelerate(build("flux"), "distrifusion")
    except RecipeError as exc:
        refused["flux"] = str(exc)
    pipe = make_tiny_sd()
    effdiff.accelerate(pipe, "distrifusion")
    try:
        pipe.unet(torch.randn(2, 1, 6, 8), 10, encoder_hidden_states=torch.randn(2, 4, 16))
    except RecipeError as exc:
        refused["rows"] = str(exc)
    return refused


def _both_models() -> dict:
    results = {kind: _cases(kind, make) for kind, make in (("sd", make_tiny_sd), ("dit", make_tiny_dit))}
    stock = {}
    for name in ("sd", "dit"):
        pipe = build(name)
        single = generate(name, pipe)
        effdiff.accelerate(pipe, "distrifusion:exchange=sync")
        stock[name] = float((generate(name, pipe) - single).abs().max())
    results["stock"] = stock
    results["refused"] = _refusals()
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return on_ranks(_both_models, tmp_path_factory.mktemp("distrifusion"))


@pytest.mark.parametrize("kind", ["sd", "dit"])
def test_fresh_exchange_gives_the_single_process_image(ranks, kind):
    row = ranks[0][kind]["distrifusion:exchange=sync"]
    assert row["diff"] < 1e-4
    assert row["sent"] > 0
    assert row["sent"] == ranks[0][kind]["planned"]  # what `effdiff plan` counts is what the method sent (11 steps)


@pytest.mark.parametrize("kind", ["sd", "dit"])
def test_stale_activations_cost_less_than_no_interaction(ranks, kind):
    case = ranks[0][kind]
    stale, fresh, naive = (case[f"distrifusion:{r}"] for r in ("warmup=2", "exchange=sync", "exchange=none"))
    assert fresh["diff"] < stale["diff"] < naive["diff"]
    assert stale["sent"] == fresh["sent"] and naive["sent"] == 0  # the same layers exchange, only later
    # through the warm-up (first step + 2) stale and fresh run the same computation
    assert torch.equal(stale["early"], fresh["early"])
    assert (stale["early"] - case["early_single"]).abs().max() < 1e-4


@pytest.mark.parametrize("kind", ["sd", "dit"])
def test_both_ranks_hold_the_whole_image_and_remove_restores(ranks, kind):
    for recipe in ("distrifusion:exchange=sync", "distrifusion:warmup=2", "distrifusion:exchange=none"):
        assert ranks[0][kind][recipe]["checksum"] == ranks[1][kind][recipe]["checksum"]
    assert ranks[0][kind]["restored"] and ranks[1][kind]["restored"]


@pytest.mark.parametrize("kind", ["sd", "dit"])
def test_it_stacks_with_a_fixed_schedule_cache(ranks, kind):
    assert ranks[0][kind]["cache_diff"] < 1e-4


def test_stock_pipelines_split(ranks):
    assert ranks[0]["stock"]["sd"] < 1e-4 and ranks[0]["stock"]["dit"] < 1e-4


def test_refusals_name_the_reason(ranks):
    refused = ranks[0]["refused"]
    assert "fbcache decides from the features" in refused["fbcache"]
    assert "tome decides from the features or changes the tokens" in refused["tome"]
    assert "FluxTransformer2DModel has concat/joint-stream blocks" in refused["flux"]
    assert "a latent of 6 rows does not split into 2 patches" in refused["rows"]


def test_without_a_process_group_it_is_refused():
    with pytest.raises(RecipeError, match="no process group with 2 or more ranks"):
        effdiff.accelerate(make_tiny_sd(), "distrifusion")


@pytest.mark.parametrize("stride", [1, 2])
def test_a_patch_with_exact_halo_rows_convolves_like_the_whole_image(stride):
    """The first layer's halo comes from the input every rank holds: each rank's rows of the output are exactly
    the whole convolution's rows (stride 2: the window of the first output row starts one row above the patch)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=stride, padding=1)
    whole = torch.randn(2, 3, 8, 6)
    expected = conv(whole)
    assert halo_rows(conv) == (1, 1 if stride == 1 else 0)
    for rank in range(4):
        wrapped = conv_with_halo(conv, Exchange(rank, 4), lambda: "sync", lambda: whole)(conv.forward)
        rows = wrapped(whole[..., rank * 2:(rank + 1) * 2, :])
        share = 2 // stride
        assert torch.allclose(rows, expected[..., rank * share:(rank + 1) * share, :], atol=1e-6)
