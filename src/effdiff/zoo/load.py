"""``effdiff.load``: bundled models by name, speed-only twins, local diffusers checkpoints.

Hub ids are tried only where a hub is reachable; offline they fail at once with a sentence that
names HF_HUB_OFFLINE and the local-path alternative, instead of half a minute of retries.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DiffusionPipeline

from effdiff.zoo.checkpoints import DENOISER_FOLDER, CheckpointError, load_classifier, read_record
from effdiff.zoo.pipelines import TinyDiTPipeline, TinySDPipeline

WEIGHTS = Path(__file__).parent / "weights"
BUNDLED = ("tiny-sd", "tiny-dit", "scene-sd", "scene-dit")
PIPELINE_OF = {"tiny-sd": TinySDPipeline, "tiny-dit": TinyDiTPipeline,
               "scene-sd": TinySDPipeline, "scene-dit": TinyDiTPipeline}


class ModelNotFoundError(ValueError):
    """The name is neither a bundled model, a twin, a local folder nor a reachable hub id."""


def _bundled(name: str) -> DiffusionPipeline:
    from effdiff.zoo.text import load_text_encoder

    if not (WEIGHTS / name).exists():
        raise ModelNotFoundError(
            f"{name!r} is a bundled model whose weights are not trained yet: expected {WEIGHTS / name}. "
            "They come from one GPU run of tools/train_scenes_gpu.sh (see the zoo README, 'Digit scenes')"
        )
    pipe = _from_folder(WEIGHTS / name, name, *load_text_encoder())
    pipe.effdiff_model_ref = name
    return pipe


def _from_folder(folder: Path, kind: str, text_encoder, tokenizer) -> DiffusionPipeline:
    sub = folder / DENOISER_FOLDER[kind]
    for needed in (sub / "config.json", sub / "diffusion_pytorch_model.safetensors",
                   folder / "scheduler" / "scheduler_config.json"):
        if not needed.exists():
            raise CheckpointError(f"missing {needed}: expected a diffusers folder with {DENOISER_FOLDER[kind]}/ "
                                  "and scheduler/ as written by save_pretrained")
    model_cls = _denoiser_class(kind)
    try:
        denoiser = model_cls.from_pretrained(sub, torch_dtype=torch.float32).eval()  # scene-* are stored fp16
        scheduler = _scheduler_class(folder / "scheduler").from_pretrained(folder / "scheduler")
    except Exception as exc:  # corrupt json / safetensors surface as many types
        raise CheckpointError(f"could not read the checkpoint in {sub}: {exc}") from exc
    denoiser.requires_grad_(False)
    pipe = PIPELINE_OF[kind](denoiser, scheduler, text_encoder, tokenizer)
    pipe.set_progress_bar_config(disable=True)
    pipe.effdiff_model_name = kind
    pipe.effdiff_model_folder = str(folder)  # where its distilled students live (effdiff.distill.store)
    pipe.effdiff_model_ref = str(folder)  # what `effdiff.load` takes to load it again (a bundled one: its name)
    return pipe


def _scheduler_class(folder: Path) -> type:
    """DDIM, or the LCMScheduler a distilled consistency student (``effdiff distill --full``) is saved with."""
    import json

    from diffusers import LCMScheduler

    name = json.loads((folder / "scheduler_config.json").read_text()).get("_class_name")
    return LCMScheduler if name == "LCMScheduler" else DDIMScheduler


def _denoiser_class(kind: str):
    from diffusers import PixArtTransformer2DModel, UNet2DConditionModel

    return UNet2DConditionModel if DENOISER_FOLDER[kind] == "unet" else PixArtTransformer2DModel


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _local(path: Path) -> DiffusionPipeline:
    if _needs_its_method(path):
        return _with_student(path)
    if _is_compressed(path):
        return _with_compressed(path)
    record = read_record(path)
    if record.get("name") in BUNDLED:
        from effdiff.zoo.text import load_text_encoder

        return _from_folder(path, record["name"], *load_text_encoder())
    if not (path / "model_index.json").exists():
        raise CheckpointError(
            f"{path} is not a diffusers checkpoint: expected {path / 'model_index.json'} "
            f"(a folder written by DiffusionPipeline.save_pretrained) or an effdiff model folder"
        )
    try:
        return DiffusionPipeline.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise CheckpointError(f"could not load the diffusers checkpoint in {path}: {exc}") from exc


def _with_student(folder: Path) -> DiffusionPipeline:
    """A student folder written by ``effdiff distill`` that needs its method to run (a LoRA, a guidance student's
    w embedding, a progressive, rectified-flow or DMD student's grid): its teacher, with the student applied as that
    method (so ``pipe.effdiff.remove()`` gives the teacher back)."""
    import json

    from effdiff.api import accelerate
    from effdiff.distill.store import RECORD

    record_path = folder / RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if not record.get("teacher"):
        raise CheckpointError(f"{folder} has a distilled student but no {RECORD} naming its teacher model")
    pipe = load(record["teacher"])
    method, form = record.get("method", "lcm"), record.get("form", "lora")
    steps = f",steps={record['steps']}" if "steps" in record else ""
    stage = f",stage={record['phase']}" if "phase" in record else ""  # a rectified-flow student's
    accelerate(pipe, f"{method}:form={form},path={folder}{steps}{stage}")
    return pipe


def _needs_its_method(path: Path) -> bool:
    """A LoRA, or a full student whose method adds more than weights and a scheduler (not a full LCM, which
    loads as the model folder it is): a trailing grid, the only step count it samples in."""
    from effdiff.distill.store import GUIDANCE_FILE, RECORD

    if (path / "lora.safetensors").is_file() or (path / GUIDANCE_FILE).is_file():
        return True
    return (path / RECORD).is_file() and read_record(path).get("distilled") in ("progressive", "rectflow", "dmd")


def _is_compressed(path: Path) -> bool:
    from effdiff.compress.trainer import RECORD

    return (path / RECORD).is_file()


def _with_compressed(folder: Path) -> DiffusionPipeline:
    """A compressed model written by ``effdiff compress``: its teacher with the compressed denoiser put in as its
    method (``pipe.effdiff.remove()`` gives the teacher back)."""
    import json

    from effdiff.api import accelerate
    from effdiff.compress.trainer import RECORD, recipe_of

    record = json.loads((folder / RECORD).read_text())
    if not record.get("teacher"):
        raise CheckpointError(f"{folder} has a compressed model but its {RECORD} names no teacher model")
    pipe = load(record["teacher"])
    accelerate(pipe, recipe_of(record, folder))
    return pipe


def _hub_reachable(timeout: float = 1.5) -> bool:
    """False at once when HF_HUB_OFFLINE is set; otherwise one short TCP probe, never a retry loop."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no"):
        return False
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def check_model(name: str) -> str:
    """What ``name`` refers to ("bundled", "twin", "local" or "hub"), or a ModelNotFoundError, without loading it.

    The bench and the CLI call this before they register a run or compute anything.
    """
    from effdiff.zoo.twins import TWINS

    if name in BUNDLED:
        return "bundled"
    if name in TWINS:
        return "twin"
    if Path(name).expanduser().exists():
        return "local"
    if _looks_like_hub_id(name):
        if not _hub_reachable():
            raise ModelNotFoundError(
                f"{name!r} looks like a Hugging Face hub id, but the hub cannot be reached (HF_HUB_OFFLINE is "
                "set, or there is no network), so nothing can be downloaded. Pass a local folder written by "
                "save_pretrained instead, or one of: "
                + ", ".join((*BUNDLED, *TWINS))
            )
        return "hub"
    raise ModelNotFoundError(
        f"no model called {name!r}: not a bundled model ({', '.join(BUNDLED)}), not a speed-only twin "
        f"({', '.join(TWINS)}), and no folder exists at {Path(name).expanduser().resolve()}"
    )


def load(name: str, dtype: torch.dtype | None = None) -> DiffusionPipeline:
    """A ready pipeline for a bundled name, a speed-only twin, a local folder, or a hub id."""
    from effdiff.zoo.twins import build_twin

    kind = check_model(name)
    if kind == "bundled":
        pipe = _bundled(name)
    elif kind == "twin":
        pipe = build_twin(name)
    elif kind == "local":
        pipe = _local(Path(name).expanduser())
    else:
        pipe = DiffusionPipeline.from_pretrained(name)
    return pipe.to(dtype=dtype) if dtype is not None else pipe


def load_feature_extractor():
    """The bundled ``mnist-features`` classifier (FID/KID features and prompt-accuracy judge)."""
    return load_classifier(WEIGHTS / "mnist-features")
