"""``pipefusion`` on two gloo ranks started here, each holding half of the tiny DiT's blocks as a pipeline stage.
One patch is plain pipeline parallelism: the single-process image bit for bit. Streaming patches makes the keys of
the patches not yet through a stage a step stale: close to the single-process image, closer with more warm-up
steps, and bit for bit it through the warm-up; both ranks end with the whole image; ``remove()`` restores the
single-process images. Refusals: no process group, a U-Net, a cache beside it, a sequence the patches do not
divide."""

from __future__ import annotations

import pytest
import torch
from _ranks import on_ranks
from conftest import make_tiny_dit, make_tiny_sd, sample

import effdiff
from effdiff import RecipeError

STEPS = 8


def _runs() -> dict:
    results: dict = {}
    pipe = make_tiny_dit()
    single = sample(pipe, steps=STEPS)
    early_single = sample(pipe, steps=2)
    for recipe in ("pipefusion:patches=1", "pipefusion", "pipefusion:warmup=4", "pipefusion:patches=4"):
        effdiff.accelerate(pipe, recipe)
        image = sample(pipe, steps=STEPS)
        early = sample(pipe, steps=2)
        results[recipe] = {"diff": float((image - single).abs().max()), "equal": bool(torch.equal(image, single)),
                           "early": bool(torch.equal(early, early_single)) if recipe == "pipefusion:warmup=4"
                           else None, "sent": pipe.effdiff.methods[0].sent_bytes, "image": image}
        pipe.effdiff.remove()
    results["restored"] = bool(torch.equal(sample(pipe, steps=STEPS), single))
    refused = {}
    for name, make, recipe in (("unet", make_tiny_sd, "pipefusion"), ("cache", make_tiny_dit, "pipefusion+fora")):
        try:
            effdiff.accelerate(make(), recipe)
        except RecipeError as exc:
            refused[name] = str(exc)
    effdiff.accelerate(pipe, "pipefusion:patches=3")
    try:
        sample(pipe, steps=3)
    except RecipeError as exc:
        refused["patches"] = str(exc)
    results["refused"] = refused
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return on_ranks(_runs, tmp_path_factory.mktemp("pipefusion"))


def test_one_patch_is_the_single_process_image_bit_for_bit(ranks):
    assert ranks[0]["pipefusion:patches=1"]["equal"] and ranks[1]["pipefusion:patches=1"]["equal"]


def test_streamed_patches_use_stale_keys_and_stay_close(ranks):
    rows = ranks[0]
    assert 0 < rows["pipefusion"]["diff"] < 0.1 and 0 < rows["pipefusion:patches=4"]["diff"] < 0.1
    assert rows["pipefusion:warmup=4"]["diff"] < rows["pipefusion"]["diff"]  # more fresh steps, closer
    assert rows["pipefusion:warmup=4"]["early"]  # through the warm-up: one patch, the single-process image
    assert ranks[1]["pipefusion"]["sent"] > 0 and rows["pipefusion"]["sent"] > 0  # stage 0 sends, the last broadcasts


def test_both_ranks_hold_the_image_and_remove_restores(ranks):
    for recipe in ("pipefusion", "pipefusion:patches=4"):
        assert torch.equal(ranks[0][recipe]["image"], ranks[1][recipe]["image"])
    assert ranks[0]["restored"] and ranks[1]["restored"]


def test_refusals_name_the_reason(ranks):
    refused = ranks[0]["refused"]
    assert "pipefusion supports dit backbones, not UNet2DConditionModel" in refused["unet"]
    assert "fora caches or reduces per layer call" in refused["cache"]
    assert "16 tokens do not split into 3 patches" in refused["patches"]


def test_without_a_process_group_it_is_refused():
    with pytest.raises(RecipeError, match="no process group with 2 or more ranks"):
        effdiff.accelerate(make_tiny_dit(), "pipefusion")
