import json

import pytest
import torch
from conftest import make_tiny, make_tiny_dit, make_tiny_sd, no_patches, sample

import effdiff
from effdiff import RecipeError
from effdiff.api import is_accelerated
from effdiff.eval.cost import find_denoiser
from effdiff.methods.cache.l2c import LearningToCache, cache_plan, router_file

STEPS = 6
KINDS = ("unet", "dit")
QUICK = f"steps={STEPS},samples=1,epochs=2"  # a router trained in well under a second on the tiny models


pytestmark = pytest.mark.usefixtures("private_cache")




def _layer_calls(pipe):
    from diffusers.models.attention import FeedForward

    calls = {"n": 0}
    for m in find_denoiser(pipe).modules():
        if isinstance(m, FeedForward):
            for leaf in m.modules():
                if isinstance(leaf, torch.nn.Linear):
                    leaf.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    return calls


@pytest.mark.parametrize("kind", KINDS)
def test_caching_nothing_is_bit_identical_and_training_leaves_the_model_alone(kind):
    pipe = make_tiny(kind)
    before = {k: v.clone() for k, v in find_denoiser(pipe).state_dict().items()}
    baseline = sample(pipe, steps=STEPS)
    effdiff.accelerate(pipe, f"l2c:{QUICK},fraction=0")
    method = pipe.effdiff.methods[0]
    assert torch.equal(sample(pipe, steps=STEPS), baseline)
    assert method.stats.cached == 0 and method.stats.full == STEPS
    assert method.record["iterations"] == 2 * (STEPS // 2) and method.record["train_seconds"] > 0
    assert all(p.grad is None and p.requires_grad for p in find_denoiser(pipe).parameters())
    assert all(torch.equal(v, before[k]) for k, v in find_denoiser(pipe).state_dict().items())
    assert len(method.record["scores"]) == STEPS and method.record["scores"][0] is None
    assert all(0 < s < 1 for row in method.record["scores"][1::2] for s in row)


@pytest.mark.parametrize("kind", KINDS)
def test_caching_skips_layers_repeats_and_restores(kind):
    pipe = make_tiny(kind)
    calls = _layer_calls(pipe)
    baseline = sample(pipe, steps=STEPS)
    full = calls["n"]
    effdiff.accelerate(pipe, f"l2c:{QUICK},fraction=0.5")
    calls["n"] = 0
    first = sample(pipe, steps=STEPS)
    method = pipe.effdiff.methods[0]
    # fraction 0.5 with period 2: every layer of every odd step is served from cache
    assert [len(p) for p in method.plan] == [0, len(method.layers)] * (STEPS // 2)
    assert calls["n"] == full // 2
    assert (method.stats.full, method.stats.cached) == (STEPS // 2, STEPS // 2)
    assert torch.isfinite(first).all() and not torch.equal(first, baseline)
    assert torch.equal(sample(pipe, steps=STEPS), first)
    assert "trained router" in method.describe()
    pipe.effdiff.remove()
    assert no_patches(pipe)
    assert torch.equal(sample(pipe, steps=STEPS), baseline)


def test_cache_plan_thresholds_to_a_target_count():
    scores = [None, [0.9, 0.1, 0.5], None, [0.2, 0.1, 0.95]]
    plan, threshold = cache_plan(scores, 2 / 12)  # 2 of 12 slots: the two lowest (a tie goes to the earlier step)
    assert plan == [frozenset(), frozenset({1}), frozenset(), frozenset({1})] and threshold == 0.1
    plan, threshold = cache_plan(scores, 4 / 12)
    assert plan[1] == {1, 2} and plan[3] == {0, 1} and threshold == 0.5
    assert cache_plan(scores, 0.0) == ([frozenset()] * 4, None)
    assert sum(map(len, cache_plan(scores, 1.0)[0])) == 6  # never more than the cache steps hold


def test_router_is_saved_and_reloaded_with_the_same_plan(tmp_path):
    path = tmp_path / "router.json"
    pipe = make_tiny_dit()
    effdiff.accelerate(pipe, f"l2c:{QUICK},fraction=0.3,router={path}")
    trained = pipe.effdiff.methods[0]
    first = sample(pipe, steps=STEPS)
    pipe.effdiff.remove()
    record = json.loads(path.read_text())
    assert record["steps"] == STEPS and record["scheduler"] == "DDIMScheduler" and len(record["timesteps"]) == STEPS
    record["epochs"] = "untouched"  # a reload must not retrain (which would rewrite the file)
    path.write_text(json.dumps(record))
    effdiff.accelerate(pipe, f"l2c:steps={STEPS},fraction=0.3,router={path}")
    loaded = pipe.effdiff.methods[0]
    assert loaded.plan == trained.plan and loaded.threshold == trained.threshold
    assert torch.equal(sample(pipe, steps=STEPS), first)
    assert json.loads(path.read_text())["epochs"] == "untouched"
    pipe.effdiff.remove()
    pipe.effdiff_model_name = "tiny-test"  # the default file is per model name and step count
    effdiff.accelerate(pipe, f"l2c:{QUICK}")
    default = router_file("tiny-test", STEPS)
    assert pipe.effdiff.methods[0].source == default and default.is_file() and default.name == "l2c-tiny-test-6.json"


def test_calibrated_fraction_is_used_unless_given(tmp_path):
    path = tmp_path / "router.json"
    pipe = make_tiny_dit()
    effdiff.accelerate(pipe, f"l2c:{QUICK},router={path}")
    pipe.effdiff.remove()
    record = json.loads(path.read_text())
    record["fraction"] = 0.25
    path.write_text(json.dumps(record))
    effdiff.accelerate(pipe, f"l2c:steps={STEPS},router={path}")
    assert pipe.effdiff.methods[0].fraction == 0.25
    pipe.effdiff.remove()
    effdiff.accelerate(pipe, f"l2c:steps={STEPS},router={path},fraction=0.1")
    assert pipe.effdiff.methods[0].fraction == 0.1


def test_another_step_count_scheduler_or_spacing_is_refused(tmp_path):
    from diffusers import DPMSolverMultistepScheduler

    path = tmp_path / "router.json"
    pipe = make_tiny_dit()
    effdiff.accelerate(pipe, f"l2c:{QUICK},router={path}")
    with pytest.raises(RecipeError, match=f"trained for {STEPS} steps, this call asks for 4"):
        sample(pipe, steps=4)
    pipe.effdiff.remove()
    with pytest.raises(RecipeError, match=f"trained for {STEPS} steps, not 8"):
        effdiff.accelerate(pipe, f"l2c:steps=8,router={path}")
    assert not is_accelerated(pipe) and no_patches(pipe)
    original = pipe.scheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(original.config)
    with pytest.raises(RecipeError, match="trained with DDIMScheduler, the pipeline uses DPMSolverMultistep"):
        effdiff.accelerate(pipe, f"l2c:steps={STEPS},router={path}")
    pipe.scheduler = type(original).from_config(original.config, timestep_spacing="trailing")
    effdiff.accelerate(pipe, f"l2c:steps={STEPS},router={path}")
    with pytest.raises(RecipeError, match="another scheduler or spacing"):
        sample(pipe, steps=STEPS)


@pytest.mark.parametrize(("recipe", "message"), [
    ("l2c:fraction=0.6", "fraction must be <= 0.5 with period=2"),
    ("l2c:period=4,fraction=0.8", "fraction must be <= 0.75"),
    ("l2c:period=1", "period"),
    ("l2c:fractoin=0.1", "did you mean 'fraction'"),
    ("l2c+fora", "cannot be stacked"),
])
def test_bad_settings_are_refused(recipe, message):
    pipe = make_tiny_dit()
    with pytest.raises(RecipeError, match=message):
        effdiff.accelerate(pipe, recipe)
    assert not is_accelerated(pipe) and no_patches(pipe)


def test_malformed_router_is_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"steps": STEPS}))
    with pytest.raises(RecipeError, match="not an L2C router"):
        effdiff.accelerate(make_tiny_dit(), f"l2c:steps={STEPS},router={bad}")


def test_backbone_without_routable_layers_is_refused():
    from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, add_attention=False)
    pipe = DDPMPipeline(unet=unet, scheduler=DDIMScheduler())
    with pytest.raises(RecipeError, match="UNet2DModel has no attention or feed-forward layers to route"):
        effdiff.accelerate(pipe, "l2c")
    assert not is_accelerated(pipe) and not any("forward" in vars(m) for m in unet.modules())


def test_separate_cfg_calls_keep_separate_caches():
    pipe = make_tiny_sd()
    inner = type(pipe)._call_denoiser

    def two_calls(x, t, text):
        return torch.cat([inner(pipe, xi, t, ti) for xi, ti in zip(x.chunk(2), text.chunk(2), strict=True)])

    pipe._call_denoiser = two_calls
    effdiff.accelerate(pipe, f"l2c:{QUICK},fraction=0.5")
    out = sample(pipe, steps=STEPS)
    method = pipe.effdiff.methods[0]
    branch = pipe.effdiff.context.state(method)
    assert branch[("slot", 1)]["outputs"] is not branch[("slot", 0)]["outputs"]
    assert torch.isfinite(out).all() and (method.stats.full, method.stats.cached) == (STEPS, STEPS)


def test_img2img_indexes_the_router_by_the_steps_actually_run():
    pipe = make_tiny_sd()
    image = torch.zeros(1, 1, 8, 8)
    baseline = sample(pipe, steps=STEPS, image=image, strength=0.5)
    effdiff.accelerate(pipe, f"l2c:{QUICK},fraction=0")
    assert torch.equal(sample(pipe, steps=STEPS, image=image, strength=0.5), baseline)
    pipe.effdiff.remove()
    effdiff.accelerate(pipe, f"l2c:{QUICK},fraction=0.5")
    out = sample(pipe, steps=STEPS, image=image, strength=0.5)
    stats = pipe.effdiff.methods[0].stats
    # router steps 3, 4, 5 run: 3 is a cache step but nothing is kept yet (full), 4 full, 5 cached
    assert (stats.full, stats.cached) == (2, 1) and torch.isfinite(out).all()


def test_registry_declaration():
    cls = effdiff.get_method("l2c")
    assert cls is LearningToCache and cls.family == "cache" and cls.paper.arxiv == "2406.01733"
    assert cls.backbones == frozenset({"unet", "dit"}) and "arXiv 2406.01733" in cls.__doc__
