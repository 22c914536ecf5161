import pytest
import torch
from conftest import make_tiny_dit, make_tiny_sd, no_patches, sample, split_cfg_calls

import effdiff
from effdiff import RecipeError
from effdiff.api import is_accelerated
from effdiff.methods.cache.deepcache import refresh_steps
from effdiff.methods.cache.dynamic import TaylorSeerBlocks
from effdiff.methods.cache.taylorseer import TaylorSeer
from effdiff.registry import all_methods

STEPS = 6

# Each block-cache method's declared examples (the conformance tester runs them on the stock pipelines), plus
# parameter variants that only these bundled models exercise, on every backbone the method declares.
BLOCK_CACHES = ("deepcache", "fbcache", "taylorseer", "taylorseer-blocks", "fora", "deltadit")
VARIANTS = {"noop": ["deepcache:interval=1,branch=3,schedule=quadratic", "taylorseer-blocks:interval=1,front=0,order=2",
                     "taylorseer:interval=1,order=2,position=step"],
            "skips": ["deepcache:interval=2,branch=2", "deepcache:schedule=quadratic",
                      "taylorseer-blocks:interval=3,warmup=1,front=0", "taylorseer-blocks:interval=3,warmup=1,order=2",
                      "taylorseer:interval=3,warmup=1,order=2,position=step", "taylorseer:interval=2,layers=attention",
                      "fora:interval=3"]}


def _table(kind: str) -> list[tuple[str, tuple[str, ...]]]:
    recipes = [all_methods()[name].examples[kind] for name in BLOCK_CACHES] + VARIANTS[kind]
    return [(r, tuple(sorted(all_methods()[r.split(":")[0]].backbones))) for r in recipes]


NO_OP = _table("noop")
SKIPPING = _table("skips") + [("fbcache:threshold=10,front=2", ("unet",))]


def _cases(table):
    return [pytest.param(recipe, kind, id=f"{kind}-{recipe}") for recipe, kinds in table for kind in kinds]


def _pipe(kind):
    return make_tiny_sd() if kind == "unet" else make_tiny_dit()


def _leaf_calls(pipe):
    """Count calls of every Linear and Conv2d inside the denoiser's blocks: the compute that really ran."""
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    calls = {"n": 0}
    kinds = (torch.nn.Linear, torch.nn.Conv2d)
    handles = [m.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
               for name, m in denoiser.named_modules() if isinstance(m, kinds) and "blocks" in name]
    return calls, handles




@pytest.mark.parametrize(("recipe", "kind"), _cases(NO_OP))
def test_refresh_every_step_is_bit_identical(recipe, kind):
    pipe = _pipe(kind)
    baseline = sample(pipe, steps=STEPS)
    effdiff.accelerate(pipe, recipe)
    assert torch.equal(sample(pipe, steps=STEPS), baseline)
    assert pipe.effdiff.methods[0].stats.cached == 0


@pytest.mark.parametrize(("recipe", "kind"), _cases(SKIPPING))
def test_skips_compute_repeats_and_restores(recipe, kind):
    pipe = _pipe(kind)
    calls, handles = _leaf_calls(pipe)
    baseline = sample(pipe, steps=STEPS)
    full = calls["n"]
    effdiff.accelerate(pipe, recipe)
    calls["n"] = 0
    first = sample(pipe, steps=STEPS)
    method = pipe.effdiff.methods[0]
    assert calls["n"] < full, "no block compute was skipped"
    assert method.stats.cached > 0 and method.stats.calls == STEPS
    assert first.shape == baseline.shape and torch.isfinite(first).all()
    assert not torch.equal(first, baseline)
    assert torch.equal(sample(pipe, steps=STEPS), first)  # state is reset per call
    assert method.stats.calls == STEPS  # and so are the statistics
    pipe.effdiff.remove()
    denoiser = pipe.unet if kind == "unet" else pipe.transformer
    assert no_patches(pipe) and not denoiser._forward_pre_hooks
    assert torch.equal(sample(pipe, steps=STEPS), baseline)
    for handle in handles:
        handle.remove()


def test_deepcache_skips_what_the_branch_says(tiny_sd):
    unet = tiny_sd.unet
    counts = {"mid": 0, "first_down": 0, "last_up_last_resnet": 0}

    def counter(key):
        return lambda *a: counts.__setitem__(key, counts[key] + 1)

    unet.mid_block.resnets[0].register_forward_pre_hook(counter("mid"))
    unet.down_blocks[0].resnets[0].register_forward_pre_hook(counter("first_down"))
    unet.up_blocks[-1].resnets[-1].register_forward_pre_hook(counter("last_up_last_resnet"))
    effdiff.accelerate(tiny_sd, "deepcache:interval=3,branch=0")
    sample(tiny_sd, steps=STEPS)
    # refresh at steps 0 and 3; branch 0 keeps only conv_in -> the last up layer live
    assert counts == {"mid": 2, "first_down": 2, "last_up_last_resnet": STEPS}
    tiny_sd.effdiff.remove()
    for key in counts:
        counts[key] = 0
    effdiff.accelerate(tiny_sd, "deepcache:interval=3,branch=1")
    sample(tiny_sd, steps=STEPS)
    assert counts == {"mid": 2, "first_down": STEPS, "last_up_last_resnet": STEPS}


def test_deepcache_matches_the_deepcache_package(tiny_sd):
    helper_module = pytest.importorskip("DeepCache")
    helper = helper_module.DeepCacheSDHelper(pipe=tiny_sd)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    theirs = sample(tiny_sd, steps=STEPS)
    helper.disable()
    effdiff.accelerate(tiny_sd, "deepcache:interval=3,branch=0")
    assert torch.equal(sample(tiny_sd, steps=STEPS), theirs)


def test_quadratic_schedule_crowds_around_the_center():
    uniform = refresh_steps(50, 3, "uniform")
    quadratic = refresh_steps(50, 3, "quadratic", center=0.3)
    assert uniform == set(range(0, 50, 3))
    assert 0 in quadratic and len(quadratic) <= len(uniform) and max(quadratic) <= 49
    near = sum(1 for s in quadratic if abs(s - 15) <= 7)
    assert near > sum(1 for s in uniform if abs(s - 15) <= 7)


class _Ctx:
    timestep = None
    step_index = 0


def _forecast_blocks(order, feature):
    method, state, ctx = TaylorSeerBlocks(order=order), {}, _Ctx()
    for t in (900.0, 800.0, 700.0):
        ctx.timestep = t
        method.store(state, ctx, feature(t))
    ctx.timestep = 640.0
    return method.estimate(state, ctx)


def _forecast_layer(order, feature):
    method, entry, ctx = TaylorSeer(order=order), {}, _Ctx()
    for t in (900.0, 800.0, 700.0):
        ctx.timestep = t
        method.store(entry, feature(t), ctx)
    ctx.timestep = 640.0
    return method.serve(entry, ctx)


@pytest.mark.parametrize("forecast", [_forecast_blocks, _forecast_layer])
def test_taylor_forecast_exact_on_lines_and_closer_with_order(forecast):
    """The paper's finite-difference Taylor series: exact for linear features, better with order on curves."""

    def line(t):
        return torch.full((2,), 3.0 - 0.5 * t, dtype=torch.float64)

    def curve(t):
        return torch.full((2,), 3.0 - 0.5 * t + 0.01 * t * t, dtype=torch.float64)

    assert torch.allclose(forecast(1, line), line(640.0)) and torch.allclose(forecast(2, line), line(640.0))
    errors = [float((forecast(k, curve) - curve(640.0)).abs().max()) for k in (0, 1, 2)]
    assert errors[0] > errors[1] > errors[2]


def test_fbcache_records_changes_and_respects_max_skip(tiny_dit):
    effdiff.accelerate(tiny_dit, "fbcache:threshold=10,max_skip=2")
    sample(tiny_dit, steps=STEPS)
    method = tiny_dit.effdiff.methods[0]
    # step 0 computes (no reference); then skip, skip, compute, skip, skip
    assert (method.stats.full, method.stats.cached) == (2, 4)
    assert len(method.changes) == STEPS


def test_separate_cfg_calls_keep_separate_caches():
    """A pipeline calling the denoiser once per CFG branch must not mix the branches' features."""
    batched = make_tiny_sd()
    separate = make_tiny_sd()
    split_cfg_calls(separate)
    for pipe in (batched, separate):
        effdiff.accelerate(pipe, "deepcache:interval=2")
    a, b = sample(batched, steps=STEPS), sample(separate, steps=STEPS)
    assert torch.allclose(a, b, atol=1e-4)
    branch_state = separate.effdiff.context.state(separate.effdiff.methods[0])
    assert ("slot", 1) in branch_state


def test_img2img_and_heun_steps():
    pipe = make_tiny_sd()
    image = torch.zeros(1, 1, 8, 8)
    baseline = sample(pipe, steps=STEPS, image=image, strength=0.5)
    effdiff.accelerate(pipe, "deepcache:interval=1")
    assert torch.equal(sample(pipe, steps=STEPS, image=image, strength=0.5), baseline)
    pipe.effdiff.remove()
    effdiff.accelerate(pipe, "deepcache:interval=2")
    sample(pipe, steps=STEPS, image=image, strength=0.5)
    stats = pipe.effdiff.methods[0].stats
    assert stats.calls == STEPS // 2 and stats.cached == 1  # 3 steps run: refresh, cached, refresh
    pipe.effdiff.remove()
    effdiff.accelerate(pipe, "heun:steps=4+taylorseer:interval=2,warmup=1")
    assert [m.name for m in pipe.effdiff.methods] == ["heun", "taylorseer"]
    out = sample(pipe, steps=4)
    stats = pipe.effdiff.methods[1].stats
    # Heun at 4 steps: 7 calls, steps 0-2 have two (predictor, corrector), step 3 one; odd steps are cached
    assert torch.isfinite(out).all() and stats.calls == 7 and stats.cached == 3


@pytest.mark.parametrize(("recipe", "kind", "message"), [
    ("deepcache:interval=0", "unet", "interval"),
    ("deepcache:schedule=cubic", "unet", "schedule"),
    ("deepcache:branch=40", "unet", "branch must be < 4"),
    ("deepcache", "dit", "supports unet backbones, not PixArtTransformer2DModel"),
    ("deltadit", "unet", "supports dit backbones"),
    ("fbcache:front=0", "dit", "front"),
    ("fbcache:back=1", "unet", "back applies to DiTs"),
    ("fbcache:front=1,back=1", "dit", "front \\+ back must leave"),
    ("fbcache:front=3", "unet", "front must be <= 2"),
    ("taylorseer:order=9", "dit", "order"),
    ("fbcache:treshold=0.1", "dit", "did you mean 'threshold'"),
    ("deepcache+fbcache", "unet", "cannot be stacked: both take over the block outputs"),
    ("fora+toca", "dit", "cannot be stacked: both take over the layer outputs"),
])
def test_bad_settings_are_refused(recipe, kind, message):
    pipe = _pipe(kind)
    baseline = sample(pipe, steps=2)
    with pytest.raises(RecipeError, match=message):
        effdiff.accelerate(pipe, recipe)
    assert not is_accelerated(pipe) and no_patches(pipe)
    assert torch.equal(sample(pipe, steps=2), baseline)


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_a_block_cache_and_a_layer_cache_stack(kind):
    """FBCache (block outputs) over FORA (layer outputs): different resources, so both run."""
    pipe = _pipe(kind)
    baseline = sample(pipe, steps=STEPS)
    effdiff.accelerate(pipe, "fora:interval=2")
    fora_alone = sample(pipe, steps=STEPS)
    pipe.effdiff.remove()
    effdiff.accelerate(pipe, "fbcache:threshold=0+fora:interval=2")
    assert torch.equal(sample(pipe, steps=STEPS), fora_alone)  # a block cache that never skips changes nothing
    pipe.effdiff.remove()
    effdiff.accelerate(pipe, "fbcache:threshold=10+fora:interval=2")
    out = sample(pipe, steps=STEPS)
    block, layer = pipe.effdiff.methods
    assert block.stats.cached > 0 and layer.stats.cached > 0 and torch.isfinite(out).all()
    pipe.effdiff.remove()
    assert no_patches(pipe) and torch.equal(sample(pipe, steps=STEPS), baseline)


def test_registry_declarations():
    for name in BLOCK_CACHES:
        cls = effdiff.get_method(name)
        assert cls.family == "cache" and cls.paper is not None and cls.paper.title
        assert cls.__doc__ and "arXiv" in cls.__doc__
    assert effdiff.get_method("deepcache").paper.arxiv == "2312.00858"


@pytest.mark.parametrize("kind", ["unet", "dit"])
@pytest.mark.parametrize("recipe", ["fora:interval=3", f"l2c:steps={STEPS},samples=1,epochs=2,fraction=0.5"])
def test_norms_feeding_only_reused_layers_are_skipped_without_changing_the_output(recipe, kind, monkeypatch,
                                                                                 tmp_path):
    from effdiff.methods.cache import base

    if recipe.startswith("l2c"):  # trained once, by the first apply, and reloaded by the second
        recipe += f",router={tmp_path / 'router.json'}"
    pipe = _pipe(kind)
    denoiser = pipe.unet if kind == "unet" else pipe.transformer
    pairs = base.feeding_norms(denoiser)
    assert pairs, "the tiny backbone's transformer blocks have LayerNorms feeding attention / feed-forward"
    calls = {"n": 0}
    layer_norm = torch.nn.functional.layer_norm

    def counted(*args, **kwargs):
        calls["n"] += 1
        return layer_norm(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "layer_norm", counted)
    with monkeypatch.context() as every_norm_computed:
        every_norm_computed.setattr(base, "feeding_norms", lambda model: [])
        effdiff.accelerate(pipe, recipe)
        every_norm = sample(pipe, steps=STEPS)
        computed = calls["n"]
        pipe.effdiff.remove()
    effdiff.accelerate(pipe, recipe)
    calls["n"] = 0
    assert torch.equal(sample(pipe, steps=STEPS), every_norm)
    cached_steps = pipe.effdiff.methods[0].stats.cached
    assert cached_steps > 0 and calls["n"] < computed
    if recipe.startswith("fora"):  # every layer is reused on a cached step, so every feeding norm is skipped
        assert calls["n"] == computed - len(pairs) * cached_steps


def test_adaptive_and_chunked_norms_are_not_skipped(tiny_dit):
    from diffusers.models.attention import BasicTransformerBlock

    from effdiff.methods.cache.base import feeding_norms

    block = tiny_dit.transformer.transformer_blocks[0]
    assert {id(n) for n, _ in feeding_norms(block)} == {id(block.norm1), id(block.norm2)}
    block.set_chunk_feed_forward(2, 1)  # ff then reads norm2's output in slices: its norm is left alone
    assert [layer for _, layer in feeding_norms(block)] == [block.attn1]
    dit = BasicTransformerBlock(16, 2, 8, cross_attention_dim=16, norm_type="ada_norm_zero", num_embeds_ada_norm=4)
    # AdaLayerNormZero also yields the gates the block needs on every step: only the plain norms are skipped
    assert [(n, layer) for n, layer in feeding_norms(dit)] == [(dit.norm2, dit.attn2), (dit.norm3, dit.ff)]


@pytest.mark.parametrize("recipe", ["fora", "l2c:steps=6,samples=1,epochs=2", "toca"])
def test_a_chunked_feed_forward_is_refused_by_the_layer_caches(recipe, tiny_dit):
    block = tiny_dit.transformer.transformer_blocks[1]
    block.set_chunk_feed_forward(2, 1)  # ff would be called once per chunk, and one cached output serve them all
    with pytest.raises(RecipeError, match=r"transformer_blocks\.1 runs its feed-forward in chunks"):
        effdiff.accelerate(tiny_dit, recipe)
    assert no_patches(tiny_dit) and not is_accelerated(tiny_dit)
