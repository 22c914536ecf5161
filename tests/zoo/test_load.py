"""``effdiff.zoo.load``: bundled models offline, local folders, and the errors for everything else."""

from __future__ import annotations

import json
import shutil
import socket
import time

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from safetensors.torch import save_file

from effdiff.zoo import BUNDLED, TWINS, ModelNotFoundError, load, load_feature_extractor
from effdiff.zoo.architectures import NOISE_SCHEDULE, DigitClassifier
from effdiff.zoo.checkpoints import CheckpointError, load_classifier, read_record, save_model
from effdiff.zoo.load import WEIGHTS
from effdiff.zoo.pipelines import TinyDiTPipeline, TinySDPipeline
from effdiff.zoo.twins import build_twin


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test instead of waiting on a socket."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name,cls,denoiser", [("tiny-sd", TinySDPipeline, "unet"),
                                               ("tiny-dit", TinyDiTPipeline, "transformer")])
def test_bundled_loads_offline(no_network, name, cls, denoiser):
    pipe = load(name)
    assert type(pipe) is cls and pipe.effdiff_model_name == name
    model = getattr(pipe, denoiser)
    assert model.config.sample_size == 32 and model.config.in_channels == 1
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    # the schedule the weights were trained for, including the clip_sample fix
    for key in ("prediction_type", "beta_schedule", "clip_sample", "timestep_spacing"):
        assert pipe.scheduler.config[key] == NOISE_SCHEDULE[key], key
    assert read_record(WEIGHTS / name)["name"] == name


def test_load_dtype():
    pipe = load("tiny-dit", dtype=torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16


def test_nonexistent_path_names_the_path(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(ModelNotFoundError) as info:
        load(str(missing))
    assert str(missing) in str(info.value)
    assert all(name in str(info.value) for name in BUNDLED)


def test_unknown_name_lists_alternatives(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="tiny-sd") as info:
        load("tiny-sdd")
    assert str(tmp_path / "tiny-sdd") in str(info.value)


@pytest.mark.parametrize("offline", ["1", "true", "ON"])
def test_hub_id_offline_fails_fast_with_advice(tmp_path, monkeypatch, no_network, offline):
    monkeypatch.chdir(tmp_path)  # so "org/model" cannot be a local folder by accident
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as info:
        load("runwayml/stable-diffusion-v1-5")
    assert time.perf_counter() - start < 2.0
    message = str(info.value)
    assert "HF_HUB_OFFLINE" in message and "local folder" in message and "runwayml/stable-diffusion-v1-5" in message
    assert "tiny-sd" in message


def test_hub_id_without_network_fails_fast(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE unset and no route to the hub: one short probe, then the same advice."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    probes = []

    def unreachable(address, timeout=None, *args, **kwargs):
        probes.append((address, timeout))
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        load("some-org/some-model")
    assert time.perf_counter() - start < 2.0
    assert len(probes) == 1 and probes[0][1] is not None and probes[0][1] <= 2.0


# --- local folders -------------------------------------------------------------------------------------------------


@pytest.fixture
def sd_copy(tmp_path):
    folder = tmp_path / "my-tiny-sd"
    shutil.copytree(WEIGHTS / "tiny-sd", folder)
    return folder


def test_local_copy_of_bundled_model_loads(sd_copy):
    pipe = load(str(sd_copy))
    bundled = load("tiny-sd")
    assert type(pipe) is TinySDPipeline and pipe.effdiff_model_name == "tiny-sd"
    for (k, a), (_, b) in zip(pipe.unet.state_dict().items(), bundled.unet.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def _corrupt_weights(folder):
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00not a safetensors file" * 8)
    return "unet/diffusion_pytorch_model.safetensors"


def _truncate_weights(folder):
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "unet/diffusion_pytorch_model.safetensors"


def _drop_weights(folder):
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    return "unet/diffusion_pytorch_model.safetensors"


def _drop_config(folder):
    (folder / "unet" / "config.json").unlink()
    return "unet/config.json"


def _corrupt_config(folder):
    (folder / "unet" / "config.json").write_text("{not json")
    return "unet/config.json"


def _drop_scheduler(folder):
    shutil.rmtree(folder / "scheduler")
    return "scheduler/scheduler_config.json"


def _corrupt_record(folder):
    (folder / "effdiff_model.json").write_text("{truncated")
    return "effdiff_model.json"


def _drop_record(folder):
    (folder / "effdiff_model.json").unlink()  # then it is neither an effdiff folder nor a diffusers one
    return "model_index.json"


@pytest.mark.parametrize("damage", [_corrupt_weights, _truncate_weights, _drop_weights, _drop_config,
                                    _corrupt_config, _drop_scheduler, _corrupt_record, _drop_record],
                         ids=lambda f: f.__name__.strip("_"))
def test_damaged_folder_raises_checkpoint_error_naming_the_file(sd_copy, damage):
    relative = damage(sd_copy)
    with pytest.raises(CheckpointError) as info:
        load(str(sd_copy))
    assert str(sd_copy / relative) in str(info.value)


def test_damaged_diffusers_folder(tmp_path):
    (tmp_path / "model_index.json").write_text("{bad")
    with pytest.raises(CheckpointError, match="model_index.json"):
        load(str(tmp_path))


def test_plain_diffusers_folder_loads(tmp_path):
    """A folder written by any DiffusionPipeline.save_pretrained goes through diffusers itself."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8), norm_num_groups=4,
                       layers_per_block=1, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path)
    pipe = load(str(tmp_path))
    assert isinstance(pipe, DDPMPipeline)
    assert torch.equal(pipe.unet.conv_in.weight, unet.conv_in.weight)


def test_save_model_round_trip(tmp_path):
    bundled = load("tiny-dit")
    out = save_model("tiny-dit", bundled.transformer, bundled.scheduler, tmp_path / "copy", {"note": "round trip"})
    assert read_record(out) == {"name": "tiny-dit", "note": "round trip"}
    again = load(str(out))
    assert type(again) is TinyDiTPipeline
    assert torch.equal(again.transformer.pos_embed.proj.weight, bundled.transformer.pos_embed.proj.weight)
    assert again.scheduler.config["prediction_type"] == bundled.scheduler.config["prediction_type"]


# --- the feature classifier ----------------------------------------------------------------------------------------


def test_feature_extractor_loads():
    model = load_feature_extractor()
    assert isinstance(model, DigitClassifier) and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    x = torch.zeros(2, 1, 32, 32)
    assert model.features(x).shape == (2, DigitClassifier.feature_dim) and model(x).shape == (2, 10)


def test_classifier_missing_or_corrupt(tmp_path):
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_classifier(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_classifier(tmp_path)
    save_file({"unrelated": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="DigitClassifier"):
        load_classifier(tmp_path)


def test_read_record_absent_and_corrupt(tmp_path):
    assert read_record(tmp_path) == {}
    (tmp_path / "effdiff_model.json").write_text(json.dumps({"name": "x"})[:-1])
    with pytest.raises(CheckpointError, match="effdiff_model.json"):
        read_record(tmp_path)


def test_twin_names_resolve_through_load():
    """``load`` hands twin names to ``build_twin``; the meta device keeps the 0.9 B-parameter build free."""
    with torch.device("meta"):
        pipe = load("dit-xl2-arch")
    assert pipe.effdiff_speed_only is True and pipe.effdiff_model_name == "dit-xl2-arch"
    assert set(TWINS) == {"sd15-arch", "pixart-alpha-arch", "dit-xl2-arch"}
    with pytest.raises(ValueError, match="unknown twin"):
        build_twin("sdxl-arch")
