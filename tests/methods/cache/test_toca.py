import pytest
import torch
from _stock import build, generate
from conftest import denoiser, make_tiny, sample, split_cfg_calls

import effdiff
from effdiff import RecipeError
from effdiff.methods.cache.toca import choose, grid_cells, minmax, spatial_bonus

STEPS = 6
ALL_TOKENS = "ratio=1,depth=0,time=0,attn=1,cross=1,mlp=1,influence=1"
KINDS = ["dit", "unet"]


def _step_outputs(pipe, steps=STEPS):
    """The denoiser's output at every step of one sampling call, and the final images."""
    outputs = []
    handle = denoiser(pipe).register_forward_hook(lambda m, a, out: outputs.append(out[0].clone()))
    try:
        images = sample(pipe, steps=steps)
    finally:
        handle.remove()
    return outputs, images


def _layers(pipe):
    """ToCa's per-block state of the last call (slot 0 of the current branch)."""
    method = pipe.effdiff.methods[0]
    return pipe.effdiff.context.state(method)[("slot", 0)]["layers"]


@pytest.mark.parametrize("kind", KINDS)
def test_refresh_every_step_is_bit_identical(kind):
    pipe = make_tiny(kind)
    baseline = sample(pipe, steps=STEPS)
    effdiff.accelerate(pipe, "toca:interval=1,ratio=0.5,influence=1")
    assert torch.equal(sample(pipe, steps=STEPS), baseline)
    assert pipe.effdiff.methods[0].stats.cached == 0


@pytest.mark.parametrize("kind", KINDS)
def test_recomputing_every_token_matches_the_baseline_at_every_step(kind):
    pipe = make_tiny(kind)
    base_steps, baseline = _step_outputs(pipe)
    effdiff.accelerate(pipe, f"toca:interval=3,{ALL_TOKENS}")
    steps, images = _step_outputs(pipe)
    method = pipe.effdiff.methods[0]
    assert method.stats.cached == 4 and method.computed_fraction == 1.0
    assert len(steps) == len(base_steps) == STEPS
    for ours, theirs in zip(steps, base_steps, strict=True):
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=1e-4)
    assert torch.allclose(images, baseline, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("interval", [2, 3])
def test_ratio_zero_is_fora(kind, interval):
    pipe = make_tiny(kind)
    effdiff.accelerate(pipe, f"fora:interval={interval}")
    fora = sample(pipe, steps=STEPS)
    pipe.effdiff.remove()
    effdiff.accelerate(pipe, f"toca:interval={interval},ratio=0")
    assert torch.equal(sample(pipe, steps=STEPS), fora)
    assert pipe.effdiff.methods[0].computed_fraction == pytest.approx(len(range(0, STEPS, interval)) / STEPS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("recipe", ["toca", "toca:attn=1,influence=1,interval=4", "toca:ratio=0.5,entropy=0,bonus=0"])
def test_partial_recompute_repeats_and_restores(kind, recipe):
    pipe = make_tiny(kind)
    baseline = sample(pipe, steps=STEPS)
    effdiff.accelerate(pipe, recipe)
    first = sample(pipe, steps=STEPS)
    method = pipe.effdiff.methods[0]
    assert 0 < method.computed_fraction < 1 and method.stats.cached > 0
    assert torch.isfinite(first).all() and not torch.equal(first, baseline)
    assert torch.equal(sample(pipe, steps=STEPS), first)  # same choices on every call: state is reset
    pipe.effdiff.remove()
    assert not any("forward" in vars(m) for m in denoiser(pipe).modules())
    assert not denoiser(pipe)._forward_pre_hooks
    assert torch.equal(sample(pipe, steps=STEPS), baseline)


def test_recomputes_fewer_tokens_in_deeper_blocks_and_per_type():
    pipe = make_tiny("dit")
    effdiff.accelerate(pipe, "toca:ratio=0.25,depth=0.6,attn=1,cross=0.6,mlp=1.6")
    fractions = pipe.effdiff.methods[0].fractions
    ff, attn, cross = ("ff", "ff"), ("attn", "attn1"), ("cross", "attn2")  # (role, sub-layer)
    assert fractions[0, ff] == pytest.approx(0.25 * 1.6 * 1.6)
    assert fractions[1, ff] == pytest.approx(0.25 * 0.4 * 1.6)
    assert fractions[0, cross] < fractions[0, attn] < fractions[0, ff]


def test_staleness_forces_recompute_of_tokens_reused_too_long():
    """With nothing but ties to go by, the same tokens win every step; staleness rotates through all of them."""
    cached_steps = STEPS - 1
    stale_max = {}
    for weight in (0, 1):
        pipe = make_tiny("dit")
        effdiff.accelerate(pipe, f"toca:interval={STEPS},ratio=0.25,depth=0,time=0,mlp=1,entropy=0,bonus=0,"
                                f"staleness={weight}")
        sample(pipe, steps=STEPS)
        stale_max[weight] = max(int(layer["stale", ("ff", "ff")].max()) for layer in _layers(pipe).values())
    assert stale_max[0] == cached_steps  # three quarters of the tokens never recomputed
    assert stale_max[1] <= 3  # a quarter per step: every token recomputed at least every 4 cached steps


def test_staleness_outweighs_a_low_score_eventually():
    entropy = torch.linspace(0, 1, 16).view(1, -1)  # token 0 always scores lowest
    stale = torch.zeros(1, 16)
    seen = set()
    for _ in range(12):
        stale += 1
        idx = choose(minmax(entropy) + stale * 0.5, 4)
        stale[0, idx[0]] = 0
        seen.update(idx[0].tolist())
    assert 0 in seen
    assert 0 not in {int(i) for i in choose(minmax(entropy), 4)[0]}


def test_spatial_bonus_spreads_the_choice_over_cells():
    score = torch.zeros(1, 64)
    score[0, :8] = torch.linspace(2, 1, 8)  # the best tokens all sit in the first row
    cells = grid_cells(8, 8, 4, score.device)
    assert cells.unique().numel() == 4
    plain = choose(score, 4)[0]
    spread = choose(spatial_bonus(score, cells, 10.0), 4)[0]
    assert set(cells[plain].tolist()) == {0}
    assert set(cells[spread].tolist()) == {0, 1, 2, 3}
    assert torch.equal(choose(spatial_bonus(score, cells, 10.0), 4), choose(spatial_bonus(score, cells, 10.0), 4))
    assert grid_cells(5, 3, 2, score.device).tolist()[-3:] == [4, 4, 5]  # edge cells are smaller


def test_batched_cfg_halves_choose_the_same_tokens_and_separate_calls_keep_separate_state():
    pipe = make_tiny("dit")
    effdiff.accelerate(pipe, "toca:ratio=0.3")
    sample(pipe, steps=STEPS)
    for layer in _layers(pipe).values():
        uncond, cond = layer["stale", ("ff", "ff")].chunk(2)
        assert torch.equal(uncond, cond)
    separate = make_tiny("dit")
    split_cfg_calls(separate)
    effdiff.accelerate(separate, "toca:ratio=0.3")
    out = sample(separate, steps=STEPS)
    branch = separate.effdiff.context.state(separate.effdiff.methods[0])
    assert ("slot", 1) in branch and branch[("slot", 0)]["layers"] is not branch[("slot", 1)]["layers"]
    assert torch.isfinite(out).all() and separate.effdiff.methods[0].stats.calls == 2 * STEPS


@pytest.mark.parametrize("name", ["pixart", "dit"])
def test_stock_pipelines(name):
    pipe = build(name)
    baseline = generate(name, pipe, steps=4)
    effdiff.accelerate(pipe, "toca:interval=2,ratio=0.5,attn=1,influence=1")
    out = generate(name, pipe, steps=4)
    assert out.shape == baseline.shape and torch.isfinite(out).all()
    assert 0 < pipe.effdiff.methods[0].computed_fraction < 1
    pipe.effdiff.remove()
    assert torch.equal(generate(name, pipe, steps=4), baseline)


def test_refusals():
    with pytest.raises(RecipeError, match="ratio"):
        effdiff.accelerate(make_tiny("dit"), "toca:ratio=1.5")
    with pytest.raises(RecipeError, match="did you mean 'interval'"):
        effdiff.accelerate(make_tiny("dit"), "toca:intervall=3")
    with pytest.raises(RecipeError, match="cannot be stacked"):
        effdiff.accelerate(make_tiny("dit"), "toca+fora")
    pipe = make_tiny("dit")
    from diffusers.models.attention_processor import AttnProcessor2_0

    class Custom(AttnProcessor2_0):
        pass

    pipe.transformer.transformer_blocks[1].attn2.set_processor(Custom())
    with pytest.raises(RecipeError, match="transformer_blocks.1.attn2 uses Custom"):
        effdiff.accelerate(pipe, "toca")
    assert not any("forward" in vars(m) for m in pipe.transformer.modules())


def test_flux_joint_attention_with_attn_factor_runs_whole():
    pipe = build("flux")
    effdiff.accelerate(pipe, "toca:attn=1")
    assert "attention is recomputed whole" in pipe.effdiff.describe()
    calls = []
    attn = pipe.transformer.transformer_blocks[0].attn
    assert "forward" not in vars(attn)  # not patched: it runs at every step
    attn.register_forward_pre_hook(lambda m, a: calls.append(1))
    generate("flux", pipe, steps=4)
    assert len(calls) == 4


def test_registry_declaration():
    cls = effdiff.get_method("toca")
    assert cls.family == "cache" and cls.paper.arxiv == "2410.05317" and "arXiv 2410.05317" in cls.__doc__


def test_the_timestep_factor_recomputes_more_tokens_late():
    """The authors' schedule: x(1 - time) at the first step rising to x(1 + time) at the last."""
    pipe = make_tiny("dit")
    counts = []
    ff = denoiser(pipe).transformer_blocks[0].ff
    inner = ff.forward
    ff.forward = lambda x: (counts.append(x.shape[1]), inner(x))[1]
    effdiff.accelerate(pipe, "toca:interval=10,ratio=0.25,depth=0,mlp=1,time=0.4")
    sample(pipe, steps=STEPS)
    tokens, cached = counts[0], counts[1:]
    factors = [1 - 0.4 + 0.8 * (k + 1) / STEPS for k in range(1, STEPS)]
    assert cached == [round(0.25 * f * tokens) for f in factors] and cached[-1] > cached[0]


def test_flux_single_block_attention_is_reused_whole_at_cached_steps():
    """attn=0: the concat attention is not computed at cached steps (its text rows are reused with the rest)."""
    pipe = build("flux")
    calls = []
    pipe.transformer.single_transformer_blocks[0].attn.to_q.register_forward_pre_hook(lambda m, a: calls.append(1))
    effdiff.accelerate(pipe, "toca:interval=2")
    generate("flux", pipe, steps=4)
    assert len(calls) == 2  # steps 0 and 2
