"""The bundled text-to-digit pipelines: the diffusers-style call, schedulers, caption cache, img2img."""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)
from PIL import Image

import effdiff.zoo.pipelines as pipelines_module
from effdiff.zoo import load, load_feature_extractor
from effdiff.zoo.data import eval_prompt, load_digits
from effdiff.zoo.text import encode_captions

_LOADED: dict = {}


def _base(name: str):
    if name not in _LOADED:
        _LOADED[name] = load(name)
    return _LOADED[name]


def fresh(name: str = "tiny-sd"):
    """A new pipeline around the (shared, read-only) bundled modules: own DDIM scheduler, empty caption cache."""
    base = _base(name)
    components = dict(base.components, scheduler=DDIMScheduler.from_config(base.scheduler.config))
    pipe = type(base)(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(params=["tiny-sd", "tiny-dit"])
def pipe(request):
    return fresh(request.param)


@pytest.fixture(scope="module")
def classifier():
    return load_feature_extractor()


@pytest.fixture(scope="module")
def heldout():
    return load_digits()


def generate(pipe, prompt="a handwritten seven", steps=4, seed=0, **kwargs):
    kwargs.setdefault("output_type", "pt")
    return pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **kwargs).images


def predicted_digits(classifier, images01: torch.Tensor) -> list[int]:
    with torch.no_grad():
        return classifier(images01 * 2 - 1).argmax(1).tolist()


@contextmanager
def count_denoiser_calls(pipe):
    calls: list[int] = []
    handle = pipe.denoiser.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        yield calls
    finally:
        handle.remove()


# --- the call ------------------------------------------------------------------------------------------------------


def test_shape_dtype_range(pipe):
    images = generate(pipe, ["a handwritten two", "the digit 5"], steps=4, num_images_per_prompt=2)
    assert images.shape == (4, 1, 32, 32) and images.dtype == torch.float32
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert images.std() > 0.1  # an image, not a constant


def test_seed_determinism(pipe):
    a, b, c = generate(pipe, steps=2, seed=0), generate(pipe, steps=2, seed=0), generate(pipe, steps=2, seed=1)
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.01


def test_latents_argument_replaces_the_seeded_noise():
    pipe = fresh()
    noise = torch.randn((1, 1, 32, 32), generator=torch.Generator().manual_seed(3))
    from_latents = pipe("a handwritten four", num_inference_steps=4, latents=noise, output_type="pt").images
    assert torch.equal(from_latents, generate(pipe, "a handwritten four", seed=3))


def test_output_types_agree():
    pipe = fresh()
    pt = generate(pipe, ["a handwritten one", "a handwritten six"], steps=2, output_type="pt")
    arr = generate(pipe, ["a handwritten one", "a handwritten six"], steps=2, output_type="np")
    pil = generate(pipe, ["a handwritten one", "a handwritten six"], steps=2, output_type="pil")
    assert isinstance(arr, np.ndarray) and arr.shape == (2, 32, 32, 1) and arr.dtype == np.float32
    np.testing.assert_array_equal(arr, pt.permute(0, 2, 3, 1).numpy())
    assert isinstance(pil, list) and len(pil) == 2
    for image, array in zip(pil, arr, strict=True):
        assert isinstance(image, Image.Image) and image.mode == "L" and image.size == (32, 32)
        np.testing.assert_array_equal(np.asarray(image), (array[..., 0] * 255).round().astype(np.uint8))
    as_tuple = fresh()("a handwritten one", num_inference_steps=1, output_type="pt", return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[0].shape == (1, 1, 32, 32)


@pytest.mark.parametrize("output_type", ["latent", "PIL", "tensor", None])
def test_bad_output_type_raises_before_denoising(output_type):
    pipe = fresh()
    with count_denoiser_calls(pipe) as calls, pytest.raises(ValueError, match="output_type"):
        pipe("a handwritten one", num_inference_steps=1, output_type=output_type)
    assert calls == []


def test_prompts_are_followed(pipe, classifier):
    """The trained weights through the pipeline's CFG + v-prediction path draw the digit asked for."""
    prompts = [eval_prompt(d) for d in range(10)]
    generators = [torch.Generator().manual_seed(d) for d in range(10)]
    images = pipe(prompts, num_inference_steps=5, generator=generators, output_type="pt").images
    correct = sum(p == d for d, p in enumerate(predicted_digits(classifier, images)))
    assert correct >= 9


def test_callback_on_step_end_sees_every_step_and_can_replace_latents():
    pipe = fresh()
    seen = []

    def callback(p, i, t, tensors):
        seen.append((i, int(t), tuple(tensors["latents"].shape)))
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 3 else tensors

    images = generate(pipe, steps=4, callback_on_step_end=callback)
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert [s[1] for s in seen] == pipe.scheduler.timesteps.tolist()
    assert all(s[2] == (1, 1, 32, 32) for s in seen)
    assert torch.equal(images, torch.full_like(images, 0.5))  # zero latents decode to mid-grey


# --- schedulers ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler_cls", [DPMSolverMultistepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler,
                                           EulerAncestralDiscreteScheduler], ids=lambda c: c.__name__)
def test_scheduler_swap(scheduler_cls, classifier):
    pipe = fresh()
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    if scheduler_cls is HeunDiscreteScheduler:  # the branch that must not pass a generator
        assert "generator" not in inspect.signature(pipe.scheduler.step).parameters
    prompts = [eval_prompt(3), eval_prompt(7)]
    with count_denoiser_calls(pipe) as calls:
        images = generate(pipe, prompts, steps=4)
    assert len(calls) == len(pipe.scheduler.timesteps) == 4 * pipe.scheduler.order - (pipe.scheduler.order - 1)
    assert images.shape == (2, 1, 32, 32) and images.min() >= 0 and images.max() <= 1
    assert predicted_digits(classifier, images) == [3, 7]  # the v-prediction config came along
    if scheduler_cls is EulerAncestralDiscreteScheduler:  # stochastic: the generator reaches its step
        assert torch.equal(images, generate(pipe, prompts, steps=4))
        assert not torch.equal(images, generate(pipe, prompts, steps=4, seed=1))


def test_karras_sigmas_with_a_repeated_timestep_run_every_step():
    """Karras spacing on the cosine schedule repeats timestep 998; the scheduler must start at entry 0."""
    pipe = fresh()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    with count_denoiser_calls(pipe) as calls:
        images = generate(pipe, steps=5)
    timesteps = pipe.scheduler.timesteps.tolist()
    assert len(set(timesteps)) < len(timesteps) == len(calls) == 5
    assert torch.isfinite(images).all() and images.shape == (1, 1, 32, 32)


# --- caption cache -------------------------------------------------------------------------------------------------


def test_caption_cache_skips_the_encoder(monkeypatch, pipe):
    encoded: list[list[str]] = []

    def spy(captions, encoder, tokenizer):
        encoded.append(list(captions))
        return encode_captions(captions, encoder, tokenizer)

    monkeypatch.setattr(pipelines_module, "encode_captions", spy)
    forwards = []
    hook = pipe.text_encoder.register_forward_hook(lambda *args: forwards.append(1))
    try:
        first = generate(pipe, "a handwritten two", steps=2)
        assert encoded == [["", "a handwritten two"]] and len(forwards) == 1
        second = generate(pipe, "a handwritten two", steps=2)
        assert encoded == [["", "a handwritten two"]] and len(forwards) == 1  # hit: no second encode
        assert torch.equal(first, second)
        generate(pipe, ["a handwritten two", "the digit 9", "the digit 9"], steps=1)
        assert encoded[1:] == [["the digit 9"]]  # only the new caption, once
        generate(pipe, "a handwritten five", steps=1, guidance_scale=1.0)
        assert encoded[2:] == [["a handwritten five"]]  # no guidance: no empty caption needed
    finally:
        hook.remove()
    cached = pipe._caption_cache["the digit 9"]
    torch.testing.assert_close(cached, encode_captions(["the digit 9"], pipe.text_encoder, pipe.tokenizer)[0])


# --- negative prompts ----------------------------------------------------------------------------------------------


def test_negative_prompt_lengths():
    pipe = fresh()
    with pytest.raises(ValueError, match="negative_prompt"):
        generate(pipe, ["a handwritten one", "a handwritten two"], steps=1,
                 negative_prompt=["a", "b", "c"])
    with pytest.raises(ValueError, match="negative_prompt"):
        generate(pipe, "a handwritten one", steps=1, num_images_per_prompt=2, negative_prompt=["a", "b"])
    images = generate(pipe, ["a handwritten one", "a handwritten two"], steps=1, num_images_per_prompt=2,
                      negative_prompt=["a handwritten seven", "a handwritten eight"])
    assert images.shape == (4, 1, 32, 32)


def test_negative_prompt_changes_the_output():
    pipe = fresh()
    plain = generate(pipe, "a handwritten one", steps=3)
    negative = generate(pipe, "a handwritten one", steps=3, negative_prompt="a handwritten seven")
    assert (plain - negative).abs().mean() > 1e-3


# --- img2img -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler_cls,strength,expected", [
    (DDIMScheduler, 1.0, 6), (DDIMScheduler, 0.5, 3), (DDIMScheduler, 0.34, 2),
    (EulerDiscreteScheduler, 0.5, 3), (HeunDiscreteScheduler, 0.5, 5),  # Heun: two calls a step, one at the end
])
def test_img2img_runs_a_tail_of_the_schedule(heldout, scheduler_cls, strength, expected):
    pipe = fresh()
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    kwargs = {"image": heldout.heldout_images[0], "strength": strength}
    with count_denoiser_calls(pipe) as calls:
        images = generate(pipe, "a handwritten zero", steps=6, **kwargs)
    assert len(calls) == expected and set(calls) == {2}  # CFG doubles the batch
    assert images.shape == (1, 1, 32, 32) and torch.isfinite(images).all()


def test_img2img_strength_trades_input_for_prompt(heldout, classifier):
    """Low strength keeps the input digit against the prompt; full strength follows the prompt."""
    pipe = fresh()
    idx = int((heldout.heldout_labels == 0).nonzero()[0])
    zero = heldout.heldout_images[idx : idx + 1]
    low = generate(pipe, "a handwritten seven", steps=5, image=zero, strength=0.2)
    full = generate(pipe, "a handwritten seven", steps=5, image=zero, strength=1.0)
    assert (low * 2 - 1 - zero).abs().mean() < 0.08
    assert predicted_digits(classifier, torch.cat([low, full])) == [0, 7]


def test_img2img_one_image_for_a_batch(heldout):
    """A single (C, H, W) image is broadcast over prompts × num_images_per_prompt."""
    pipe = fresh()
    with count_denoiser_calls(pipe) as calls:
        images = generate(pipe, ["a handwritten one", "a handwritten two"], steps=2, num_images_per_prompt=2,
                          image=heldout.heldout_images[0], strength=0.5)
    assert images.shape == (4, 1, 32, 32) and calls == [8]


@pytest.mark.parametrize("strength", [0.0, -0.2, 1.5, 0.05])
def test_invalid_strength_raises(heldout, strength):
    """Outside (0, 1], or so small that no step is left (0.05 × 10 steps), is a ValueError, not a crash."""
    with pytest.raises(ValueError, match="strength"):
        generate(fresh(), steps=10, image=heldout.heldout_images[0], strength=strength)
