"""scene-sd / scene-dit: sizes, shapes, the pipelines at 64×64×3, fp16 export and loading."""

from __future__ import annotations

import importlib

import pytest
import torch
from safetensors.torch import load_file

from effdiff.zoo.architectures import build_scene_dit, build_scene_sd, default_scheduler
from effdiff.zoo.checkpoints import DENOISER_FOLDER, read_record, save_model
from effdiff.zoo.load import PIPELINE_OF, WEIGHTS, ModelNotFoundError, _from_folder, load
from effdiff.zoo.text import MAX_TOKENS, TEXT_DIM

BUILDERS = {"scene-sd": build_scene_sd, "scene-dit": build_scene_dit}
PROMPTS = ["a red 3 left of a blue 7", "two green fives"]


@pytest.fixture(scope="module", params=list(BUILDERS))
def kind_and_model(request):
    torch.manual_seed(0)
    return request.param, BUILDERS[request.param]().eval()


def _pipeline(kind: str, model: torch.nn.Module):
    """A pipeline without MiniLM: the prompts' states are preloaded, as on the GPU machine."""
    pipe = PIPELINE_OF[kind](model, default_scheduler(), None, None)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    pipe._caption_cache.update({p: torch.randn(MAX_TOKENS, TEXT_DIM, generator=gen) for p in ["", *PROMPTS]})
    return pipe


def test_size_and_shapes(kind_and_model):
    kind, model = kind_and_model
    params = sum(p.numel() for p in model.parameters())
    assert 5e6 <= params <= 30e6, params
    assert model.config.sample_size == 64 and model.config.in_channels == model.config.out_channels == 3
    if kind == "scene-dit":
        assert (64 // model.config.patch_size) ** 2 == 256  # patch 4 → 256 tokens


def test_pipeline_generates_rgb_scenes(kind_and_model):
    kind, model = kind_and_model
    pipe = _pipeline(kind, model)
    out = pipe(PROMPTS, num_inference_steps=2, guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
               output_type="pt").images
    assert out.shape == (2, 3, 64, 64) and out.min() >= 0 and out.max() <= 1
    image = pipe(PROMPTS[0], num_inference_steps=1).images[0]
    assert image.mode == "RGB" and image.size == (64, 64)


def test_fp16_export_loads_back_as_fp32(kind_and_model, tmp_path):
    kind, model = kind_and_model
    folder = save_model(kind, model, default_scheduler(), tmp_path / kind, {"note": "test"})
    stored = load_file(str(folder / DENOISER_FOLDER[kind] / "diffusion_pytorch_model.safetensors"))
    assert all(t.dtype == torch.float16 for t in stored.values())
    assert next(model.parameters()).dtype == torch.float32  # exporting did not cast the trained model
    assert (folder / DENOISER_FOLDER[kind] / "diffusion_pytorch_model.safetensors").stat().st_size < 16 * 2**20
    pipe = _from_folder(folder, kind, None, None)
    assert type(pipe) is PIPELINE_OF[kind] and pipe.denoiser.dtype == torch.float32
    for (name, a), b in zip(model.state_dict().items(), pipe.denoiser.state_dict().values(), strict=True):
        assert torch.equal(a.half().float(), b), name
    assert read_record(folder) == {"name": kind, "note": "test"}


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_bundled_scene_model(kind, monkeypatch):
    if not (WEIGHTS / kind).exists():
        with pytest.raises(ModelNotFoundError, match="not trained yet"):
            load(kind)
        pytest.skip(f"{kind} is not trained yet ({WEIGHTS / kind} is missing: tools/train_scenes_gpu.sh makes it)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load(kind)
    assert pipe.effdiff_model_name == kind and pipe.denoiser.dtype == torch.float32
    out = pipe(PROMPTS, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == (2, 3, 64, 64)


def test_missing_scene_weights_say_so(monkeypatch, tmp_path):
    load_module = importlib.import_module("effdiff.zoo.load")  # the package re-exports a function of that name
    monkeypatch.setattr(load_module, "WEIGHTS", tmp_path)
    with pytest.raises(ModelNotFoundError, match="not trained yet.*train_scenes_gpu"):
        load("scene-dit")


def test_scene_training_steps_export_fp16(tmp_path):
    from effdiff.zoo.train import TrainConfig, train

    out = train(TrainConfig(model="scene-dit", steps=2, batch_size=2, warmup=1), tmp_path / "run")
    record = read_record(out)
    assert record["steps_done"] == 2 and record["name"] == "scene-dit"
    stored = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(t.dtype == torch.float16 for t in stored.values())
    assert (tmp_path / "run" / "checkpoint.pt").exists()
