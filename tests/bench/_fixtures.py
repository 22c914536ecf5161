"""Tiny random pipelines and a fake ``accelerate``: bench tests need neither trained weights nor the core."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from effdiff.registry import RecipeError
from effdiff.zoo.architectures import default_scheduler
from effdiff.zoo.pipelines import TinySDPipeline
from effdiff.zoo.text import TEXT_DIM, load_text_encoder

_TEXT = None


@pytest.fixture(scope="module")
def one_thread():
    """Two OpenMP threads on a loaded 2-core machine slow tiny ops 50×; tests check logic, not speed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=32, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=2, norm_num_groups=4,
    ).eval().requires_grad_(False)


def tiny_pipeline(name: str = "tiny-random", speed_only: bool = False) -> TinySDPipeline:
    """A 32×32 text-to-digit pipeline with a few-thousand-parameter random U-Net (the real MiniLM encoder)."""
    global _TEXT
    if _TEXT is None:
        _TEXT = load_text_encoder()
    pipe = TinySDPipeline(tiny_unet(), default_scheduler(), *_TEXT)
    pipe.set_progress_bar_config(disable=True)
    pipe.effdiff_model_name = name
    if speed_only:
        pipe.effdiff_speed_only = True
    return pipe


class _Handle:
    def __init__(self, pipe, hook, recipe: str) -> None:
        self._pipe, self._hook, self._recipe = pipe, hook, recipe

    def remove(self) -> None:
        self._hook.remove()
        del self._pipe.effdiff

    def describe(self) -> str:
        return f"fake {self._recipe} (simulated)"


class FakeAccelerate:
    """``scale:<f>`` multiplies the denoiser output by f; records calls; can fail on chosen recipes.

    ``fail_on`` interrupts while applying; ``refuse_in_call`` raises a ``RecipeError`` from inside the
    pipeline call (as a method that checks the call's arguments does).
    """

    def __init__(self, fail_on: set[str] | None = None, refuse_in_call: set[str] | None = None) -> None:
        self.calls: list[str] = []
        self.fail_on = set(fail_on or ())
        self.refuse_in_call = set(refuse_in_call or ())

    def __call__(self, pipe, recipe: str):
        self.calls.append(recipe)
        if recipe in self.fail_on:
            raise KeyboardInterrupt(f"simulated interruption in {recipe}")
        factor = float(recipe.split(":")[1])
        denoiser = pipe.unet

        def hook(module, args, output):
            if recipe in self.refuse_in_call:
                raise RecipeError(f"{recipe}: refused inside the call")
            return (output[0] * factor, *output[1:]) if isinstance(output, tuple) else output * factor

        pipe.effdiff = _Handle(pipe, denoiser.register_forward_hook(hook), recipe)
        return pipe
