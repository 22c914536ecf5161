import pytest
import torch
from _stock import build, generate
from conftest import TEXT_DIM, make_tiny_dit, make_tiny_sd, no_patches, sample, split_cfg_calls

import effdiff
from effdiff import RecipeError
from effdiff.methods.tokens.atedm import attention_with_map

STEPS = 4
# the conftest U-Net's attention runs at downsample 2 (a 4x4 token grid at 8x8)
RECIPES = {
    "tome": "tome:ratio=0.5,max_downsample=2",
    "tome-all": "tome:ratio=0.7,max_downsample=2,merge_crossattn=true,merge_mlp=true,use_rand=false",
    "atedm": "atedm:ratio=0.5,early=0,max_downsample=2",
    "todo": "todo:factor=2",
}
ZERO = ["todo:factor=1",
        "tome:ratio=0,max_downsample=2", "atedm:ratio=0,max_downsample=2", "atedm:ratio=0.5,early=1,max_downsample=2"]


def _pipe(kind):
    return make_tiny_sd() if kind == "unet" else make_tiny_dit()


def _denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def _units(method):
    """What reduces once per call: a ToMe block, an AT-EDM span (its first block ranks for all of it)."""
    return len(getattr(method, "spans", method.blocks))




@pytest.mark.parametrize("kind", ["unet", "dit"])
@pytest.mark.parametrize("recipe", ZERO)
def test_nothing_reduced_is_bit_identical(kind, recipe):
    pipe = _pipe(kind)
    baseline = sample(pipe, steps=STEPS)
    effdiff.accelerate(pipe, recipe)
    assert torch.equal(sample(pipe, steps=STEPS), baseline)
    assert pipe.effdiff.methods[0].reduced_calls == 0


@pytest.mark.parametrize("kind", ["unet", "dit"])
@pytest.mark.parametrize("recipe", list(RECIPES.values()), ids=list(RECIPES))
def test_reduces_repeats_and_restores(kind, recipe):
    pipe = _pipe(kind)
    baseline = sample(pipe, steps=STEPS)
    effdiff.accelerate(pipe, recipe)
    first = sample(pipe, steps=STEPS)
    method = pipe.effdiff.methods[0]
    assert method.reduced_calls == STEPS * _units(method)
    assert first.shape == baseline.shape and torch.isfinite(first).all()
    assert not torch.equal(first, baseline)
    assert torch.equal(sample(pipe, steps=STEPS), first)  # seeded per (step, block): every call alike
    pipe.effdiff.remove()
    assert no_patches(pipe) and not _denoiser(pipe)._forward_pre_hooks
    assert torch.equal(sample(pipe, steps=STEPS), baseline)


def test_tome_shrinks_what_attention_sees():
    pipe = make_tiny_dit()
    seen = []
    block = pipe.transformer.transformer_blocks[0]
    block.attn1.to_q.register_forward_pre_hook(lambda m, args: seen.append(("attn1", args[0].shape[1])))
    block.attn2.to_q.register_forward_pre_hook(lambda m, args: seen.append(("attn2", args[0].shape[1])))
    effdiff.accelerate(pipe, "tome:ratio=0.5")
    sample(pipe, steps=1)
    assert seen == [("attn1", 8), ("attn2", 16)]  # 16 tokens (8x8 / patch 2), half merged before attn1 only


@pytest.mark.parametrize(("kind", "size"), [("unet", (14, 10)), ("unet", (10, 10)), ("dit", (10, 14))])
@pytest.mark.parametrize("recipe", list(RECIPES.values()), ids=list(RECIPES))
def test_odd_grids(kind, size, recipe):
    """Odd token counts and grids the stride does not divide: 7x5 and 5x5 U-Net grids, a 5x7 DiT grid."""
    pipe = _pipe(kind)
    x = torch.randn(2, 1, *size, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 500])
    text = torch.randn(2, 4, TEXT_DIM, generator=torch.Generator().manual_seed(1))

    def call():
        if kind == "unet":
            return pipe.unet(x, t, encoder_hidden_states=text).sample
        return pipe.transformer(x, encoder_hidden_states=text, timestep=t,
                                added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample

    with torch.no_grad():
        baseline = call()
        effdiff.accelerate(pipe, recipe)
        out = call()
    assert out.shape == baseline.shape and torch.isfinite(out).all() and not torch.equal(out, baseline)
    assert pipe.effdiff.methods[0].reduced_calls == _units(pipe.effdiff.methods[0])


@pytest.mark.parametrize("recipe", list(RECIPES.values()), ids=list(RECIPES))
def test_batched_cfg_matches_separate_calls(recipe):
    """Matching is per batch element and the partition per (step, block): CFG batched or split agree."""
    batched, separate = make_tiny_sd(), make_tiny_sd()
    split_cfg_calls(separate)
    for pipe in (batched, separate):
        effdiff.accelerate(pipe, recipe)
    assert torch.allclose(sample(batched, steps=STEPS), sample(separate, steps=STEPS), atol=1e-5)


@pytest.mark.parametrize(("recipe", "match"), [
    ("tome:ratio=0.8", "at most 1 - 1/\\(sx\\*sy\\) = 0.75"),
    ("tome:ratio=0.9,sx=2,sy=4", "= 0.875"),
    ("tome:ratio=1", "cannot be honoured"),
    ("tome:ratio=-0.1", "ratio"),
    ("tome:ratio=0.5,sx=1,sy=1", "= 0"),
    ("tome:ratio=0.3,merge_attn=false", "nothing would be merged"),
    ("atedm:ratio=1", "would prune every token"),
    ("atedm:early_ratio=1.5", "early_ratio"),
])
def test_invalid_settings_refused(recipe, match):
    with pytest.raises(RecipeError, match=match):
        effdiff.accelerate(make_tiny_dit(), recipe)


def test_high_ratio_honoured_with_a_wider_stride():
    pipe = make_tiny_dit()
    effdiff.accelerate(pipe, "tome:ratio=0.85,sx=4,sy=2")  # 1 - 1/8 = 0.875 >= 0.85
    sample(pipe, steps=1)
    assert pipe.effdiff.methods[0].reduced_calls == 2


def test_grid_smaller_than_stride_is_an_error_not_a_silent_skip():
    pipe = make_tiny_sd()
    effdiff.accelerate(pipe, "tome:ratio=0.5,max_downsample=2,sx=8,sy=8")  # 4x4 grid
    with pytest.raises(RecipeError, match="smaller than the 8x8 stride"):
        sample(pipe, steps=1)


def test_no_block_at_an_explicit_level_is_refused_with_the_levels():
    with pytest.raises(RecipeError, match=r"run at downsample 2\); raise max_downsample"):
        effdiff.accelerate(make_tiny_sd(), "tome:max_downsample=1")


def test_default_level_falls_back_to_the_shallowest_attention():
    """tiny-sd's attention starts at downsample 2: the default merges there instead of refusing."""
    pipe = make_tiny_sd()
    baseline = sample(pipe, steps=STEPS)
    effdiff.accelerate(pipe, "tome")
    method = pipe.effdiff.methods[0]
    assert {b.level for b in method.blocks} == {2} and "downsample 2" in method.describe()
    assert not torch.equal(sample(pipe, steps=STEPS), baseline)


@pytest.mark.parametrize("name", ["sd", "pixart", "dit"])
@pytest.mark.parametrize("recipe", ["tome:ratio=0.5", "atedm:ratio=0.5,early=0"])
def test_stock_pipelines(name, recipe):
    pipe = build(name)
    baseline = generate(name, pipe)
    effdiff.accelerate(pipe, recipe)
    out = generate(name, pipe)
    assert out.shape == baseline.shape and torch.isfinite(out).all()
    assert pipe.effdiff.methods[0].reduced_calls > 0
    pipe.effdiff.remove()
    assert torch.equal(generate(name, pipe), baseline)


def test_stacks_with_deepcache_and_a_solver():
    pipe = make_tiny_sd()
    baseline = sample(pipe, steps=6)
    effdiff.accelerate(pipe, "tome:ratio=0.5,max_downsample=2+deepcache:interval=2+dpmpp2m:steps=6")
    assert [m.name for m in pipe.effdiff.methods] == ["dpmpp2m", "tome", "deepcache"]
    out = sample(pipe, steps=6)
    tome, deepcache = pipe.effdiff.methods[1], pipe.effdiff.methods[2]
    assert torch.isfinite(out).all() and deepcache.stats.cached == 3
    assert 0 < tome.reduced_calls < 6 * len(tome.blocks)  # blocks served from DeepCache's cache never run
    pipe.effdiff.remove()
    assert torch.equal(sample(pipe, steps=6), baseline)
    with pytest.raises(RecipeError, match="cannot be stacked"):
        effdiff.accelerate(pipe, "tome:max_downsample=2+atedm:max_downsample=2")


def test_atedm_dsap_prunes_only_after_the_early_steps():
    pipe = make_tiny_dit()
    effdiff.accelerate(pipe, "atedm:ratio=0.5,early=0.5")
    sample(pipe, steps=STEPS)
    method = pipe.effdiff.methods[0]
    assert method.reduced_calls == (STEPS // 2) * _units(method)


@pytest.mark.parametrize("rows", [256, 5])
def test_atedm_attention_matches_the_stock_processor(rows):
    attn = make_tiny_dit().transformer.transformer_blocks[0].attn1
    x = torch.randn(2, 16, attn.to_q.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, probs = attention_with_map(attn, x, rows=rows)
        assert torch.allclose(out, attn(x), atol=1e-5)
    assert probs.shape == (2, 16, 16) and torch.allclose(probs.sum(-1), torch.ones(2, 16))


def test_tome_matches_tomesd_without_randomness(tiny_sd):
    tomesd = pytest.importorskip("tomesd")
    tomesd.apply_patch(tiny_sd, ratio=0.5, max_downsample=2, use_rand=False, merge_mlp=True)
    theirs = sample(tiny_sd, steps=STEPS)
    tomesd.remove_patch(tiny_sd)
    effdiff.accelerate(tiny_sd, "tome:ratio=0.5,max_downsample=2,use_rand=false,merge_mlp=true")
    assert torch.allclose(sample(tiny_sd, steps=STEPS), theirs, atol=1e-5)


def _tokens_seen(module, seen):
    def record(module, args, kwargs):
        seen.append((args or [kwargs["hidden_states"]])[0].shape[1])

    module.register_forward_pre_hook(record, with_kwargs=True)


@pytest.mark.parametrize("span", [1, 2])
def test_atedm_tokens_stay_pruned_through_a_span(span):
    """span=2 on the two-block tiny DiT: block 1 runs whole on the kept tokens (fused, no map); span=1 ranks
    in both blocks and recovers after each."""
    pipe = make_tiny_dit()
    baseline = sample(pipe, steps=2)
    blocks = pipe.transformer.transformer_blocks
    first, second = [], []
    _tokens_seen(blocks[0].ff.net[0], first)  # inside the patched forward: what the feed-forward computes on
    _tokens_seen(blocks[1], second)
    effdiff.accelerate(pipe, f"atedm:ratio=0.5,early=0,span={span}")
    out = sample(pipe, steps=2)
    method = pipe.effdiff.methods[0]
    assert [len(s) for s in method.spans] == ([1, 1] if span == 1 else [2])
    assert first == [8, 8] and second == ([16, 16] if span == 1 else [8, 8])
    assert out.shape == baseline.shape and torch.isfinite(out).all() and not torch.equal(out, baseline)
    assert torch.equal(sample(pipe, steps=2), out)
    pipe.effdiff.remove()
    assert torch.equal(sample(pipe, steps=2), baseline)


def test_atedm_unet_spans_are_attention_blocks():
    pipe = build("sd")
    effdiff.accelerate(pipe, "atedm:ratio=0.5,early=0")
    method = pipe.effdiff.methods[0]
    assert all(len({b.name.rsplit(".", 2)[0] for b in span}) == 1 for span in method.spans)
    assert len(method.spans) == len({b.name.rsplit(".", 2)[0] for b in method.blocks})


def test_atedm_flux_spans_keep_text_and_rotary_rows():
    """Double and single blocks span separately; a later block sees the kept image tokens, every text token,
    and (two images per prompt) per-element rotary rows."""
    pipe = build("flux")
    seen = []
    _tokens_seen(pipe.transformer.single_transformer_blocks[1], seen)
    effdiff.accelerate(pipe, "atedm:ratio=0.5,early=0")
    method = pipe.effdiff.methods[0]
    assert [[b.streams for b in span] for span in method.spans] == [["joint"], ["concat", "concat"]]
    images = pipe("a red apple", height=16, width=16, num_inference_steps=2, num_images_per_prompt=2,
                  max_sequence_length=16, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert images.shape[0] == 2 and torch.isfinite(images).all()
    assert seen[0] == 16 - 8 and method.reduced_calls == 2 * 2
