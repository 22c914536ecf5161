import pytest
import torch
from conftest import make_tiny_dit, make_tiny_sd, no_patches, sample, split_cfg_calls

import effdiff
from effdiff import RecipeError
from effdiff.api import is_accelerated
from effdiff.methods.cache.faster import PAPER_KEYS_50, FasterDiffusion, key_steps

STEPS = 6




def _counter(module, counts, key):
    counts[key] = 0
    module.register_forward_pre_hook(lambda *a: counts.__setitem__(key, counts[key] + 1))


@pytest.mark.parametrize("recipe", [
    "faster:schedule=uniform,interval=1",
    "faster:keys=0|1|2|3|4|5",
    "faster:schedule=uniform,interval=1,noise=0.01,noise_below=0",  # injection below t=0: never
])
def test_encoder_every_step_is_bit_identical(recipe, tiny_sd):
    baseline = sample(tiny_sd, steps=STEPS)
    effdiff.accelerate(tiny_sd, recipe)
    assert torch.equal(sample(tiny_sd, steps=STEPS), baseline)
    assert tiny_sd.effdiff.methods[0].stats.cached == 0


def test_skips_the_encoder_only_repeats_and_restores(tiny_sd):
    counts = {}
    _counter(tiny_sd.unet.down_blocks[0].resnets[0], counts, "down")  # inside the patched blocks
    _counter(tiny_sd.unet.mid_block.resnets[0], counts, "mid")
    _counter(tiny_sd.unet.up_blocks[0].resnets[0], counts, "up")
    baseline = sample(tiny_sd, steps=STEPS)
    effdiff.accelerate(tiny_sd, "faster:schedule=uniform,interval=3")
    counts.update(down=0, mid=0, up=0)
    first = sample(tiny_sd, steps=STEPS)
    assert counts == {"down": 2, "mid": 2, "up": STEPS}  # key steps 0 and 3; the decoder runs every step
    stats = tiny_sd.effdiff.methods[0].stats
    assert (stats.full, stats.cached) == (2, 4)
    assert first.shape == baseline.shape and torch.isfinite(first).all() and not torch.equal(first, baseline)
    assert torch.equal(sample(tiny_sd, steps=STEPS), first)  # state reset per call
    tiny_sd.effdiff.remove()
    assert no_patches(tiny_sd)
    assert torch.equal(sample(tiny_sd, steps=STEPS), baseline)


def test_key_step_schedules():
    assert key_steps(50, "nonuniform", 2) == set(PAPER_KEYS_50)
    assert key_steps(10, "nonuniform", 2) == {0, 1, 2, 3, 5, 7}  # the paper's list scaled, step 0 kept
    assert key_steps(7, "uniform", 3) == {0, 3, 6}
    assert key_steps(8, "uniform", 3, keys=[2, 5, 40]) == {0, 2, 5}
    early = key_steps(50, "nonuniform", 2)
    assert sum(k < 10 for k in early) > sum(k >= 25 for k in early)  # denser early
    assert FasterDiffusion(keys="5|1;0").keys == [0, 1, 5]


def test_separate_cfg_calls_keep_separate_features():
    batched, separate = make_tiny_sd(), make_tiny_sd()
    split_cfg_calls(separate)
    for pipe in (batched, separate):
        effdiff.accelerate(pipe, "faster:schedule=uniform,interval=2")
    a, b = sample(batched, steps=STEPS), sample(separate, steps=STEPS)
    assert torch.allclose(a, b, atol=1e-4)
    branch = separate.effdiff.context.state(separate.effdiff.methods[0])
    assert ("slot", 1) in branch and branch[("slot", 1)]["outputs"] is not branch[("slot", 0)]["outputs"]
    assert separate.effdiff.methods[0].stats.calls == 2 * STEPS


def test_img2img_counts_the_steps_actually_run(tiny_sd):
    image = torch.zeros(1, 1, 8, 8)
    baseline = sample(tiny_sd, steps=STEPS, image=image, strength=0.5)
    effdiff.accelerate(tiny_sd, "faster:schedule=uniform,interval=1")
    assert torch.equal(sample(tiny_sd, steps=STEPS, image=image, strength=0.5), baseline)
    tiny_sd.effdiff.remove()
    effdiff.accelerate(tiny_sd, "faster:schedule=uniform,interval=2")
    out = sample(tiny_sd, steps=STEPS, image=image, strength=0.5)
    stats = tiny_sd.effdiff.methods[0].stats
    # 3 of 6 steps run; the first one run is a key step (no features yet), then cached, then key
    assert (stats.full, stats.cached) == (2, 1) and torch.isfinite(out).all()


def test_prior_noise_injection_adds_the_initial_latent_late(tiny_sd):
    received = []  # (timestep, sample) as the scheduler gets it, after the injection
    inner = tiny_sd.scheduler.step

    def spy(model_output, timestep, sample_, **kwargs):
        received.append((float(timestep), sample_.clone()))
        return inner(model_output, timestep, sample_, **kwargs)

    tiny_sd.scheduler.step = spy  # effdiff's wrappers go on top of it
    effdiff.accelerate(tiny_sd, "faster:schedule=uniform,interval=1,noise=0.5,noise_below=0.5")
    runs = []
    for _ in range(2):  # the initial latent is re-read on every call
        received.clear()
        latents = []  # the pipeline's own sample after each step, before any injection
        runs.append(sample(tiny_sd, steps=STEPS, callback_on_step_end=lambda p, i, t, kw, out=latents: out.append(
            kw["latents"].clone()) or {}))
        initial = received[0][1]
        before = [initial, *latents[:-1]]
        late = 0
        for (t, got), plain in zip(received, before, strict=True):
            expected = plain + 0.5 * initial if t < 500 else plain
            assert torch.equal(got, expected)
            late += t < 500
        assert 0 < late < STEPS
    assert torch.equal(runs[0], runs[1])
    tiny_sd.effdiff.remove()
    assert vars(tiny_sd.scheduler)["step"] is spy
    del tiny_sd.scheduler.step
    assert no_patches(tiny_sd)


@pytest.mark.parametrize(("recipe", "message"), [
    ("faster:keys=a|b", "step indices"),
    ("faster:keys=-1|2", "non-negative"),
    ("faster:schedule=quadratic", "schedule"),
    ("faster:interval=0", "interval"),
    ("faster:noise=2", "noise"),
    ("faster+deepcache", "cannot be stacked"),
])
def test_bad_settings_are_refused(recipe, message, tiny_sd):
    with pytest.raises(RecipeError, match=message):
        effdiff.accelerate(tiny_sd, recipe)
    assert not is_accelerated(tiny_sd) and no_patches(tiny_sd)


def test_dit_is_refused():
    pipe = make_tiny_dit()
    with pytest.raises(RecipeError, match="faster supports unet backbones, not PixArtTransformer2DModel"):
        effdiff.accelerate(pipe, "faster")


def test_registry_declaration():
    cls = effdiff.get_method("faster")
    assert cls is FasterDiffusion and cls.family == "cache" and cls.paper.arxiv == "2312.09608"
    assert "arXiv 2312.09608" in cls.__doc__
