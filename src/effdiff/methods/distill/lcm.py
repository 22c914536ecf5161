"""``lcm``: sample with a latent consistency student in a few steps and no classifier-free-guidance pass.

The student is trained by ``effdiff distill MODEL --method lcm`` (``effdiff.distill``) and found beside the model:
an LCM-LoRA (default) is merged into the denoiser's weights, a fully distilled student's weights replace the
teacher's; either way every replaced tensor goes through the undo log, so ``remove()`` gives the teacher back bit
for bit. The scheduler becomes diffusers' ``LCMScheduler`` on the teacher's noise schedule, the default steps the
recipe's, and the guidance 1 (folded into the student at training) unless the call sets them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from effdiff.distill import lora
from effdiff.distill.store import RECORD, find_student, make_command
from effdiff.patches import split_name
from effdiff.registry import FAMILIES, Method, Paper, Param, RecipeError

LCM = Paper("Latent Consistency Models: Synthesizing High-Resolution Images with Few-Step Inference",
            "2310.04378", "arXiv 2023")
LCM_LORA = Paper("LCM-LoRA: A Universal Stable-Diffusion Acceleration Module", "2311.05556", "arXiv 2023")


class LatentConsistency(Method):
    """Few-step sampling with a consistency-distilled student (LCM; LCM-LoRA for the LoRA form).

    Paper: Latent Consistency Models (Luo et al., arXiv 2310.04378); the LoRA form: LCM-LoRA (Luo et al., arXiv
    2311.05556); the objective: Consistency Models (Song et al., arXiv 2303.01469).
    """

    name = "lcm"
    family = "distill"
    paper = LCM
    summary = "consistency-distilled student (LCM-LoRA or full): 1-8 steps, no CFG pass"
    params = {
        "steps": Param(int, 4, 1, 50, help="default num_inference_steps (an explicit call wins)"),
        "form": Param(str, "lora", choices=("lora", "full"),
                      help="LCM-LoRA merged into the weights, or a full student"),
        "path": Param(str, "", help="a student folder (default: the model's distill/lcm-lora or distill/lcm)"),
    }
    after = ("solver",)
    before = tuple(f for f in FAMILIES if f not in ("solver", "distill"))
    exclusive = ("scheduler", "denoiser weights")
    decides = frozenset({"num_inference_steps", "guidance_scale"})

    def _folder(self, pipe: Any) -> Path:
        form = self.values["form"]
        if self.values["path"]:
            folder = Path(self.values["path"]).expanduser()
            if not folder.is_dir():
                raise RecipeError(f"lcm: path {str(folder)!r} is not a folder (one written by effdiff distill)")
            return folder
        found = find_student(pipe, "lcm", form)
        if found is None:
            what = "LCM-LoRA" if form == "lora" else "fully distilled LCM student"
            raise RecipeError(f"lcm: this model has no {what} yet; make one with `{make_command(pipe, 'lcm', form)}` "
                              "(or pass path=FOLDER)")
        return found

    def _check_teacher(self, folder: Path, record: dict[str, Any]) -> None:
        from effdiff.methods.solvers.schedule import model_fingerprint

        expected = record.get("teacher_fingerprint")
        if expected and expected != model_fingerprint(self.adapter.model):
            raise RecipeError(f"lcm: the student in {folder} was distilled from other weights than this "
                              f"pipeline's {type(self.adapter.model).__name__} (teacher {record.get('teacher')!r}); "
                              "distill one for these weights")

    def _replace(self, module: nn.Module, attr: str, value: torch.Tensor) -> None:
        self.patches.tensor(module, attr, nn.Parameter(value, requires_grad=False))

    def _merge_lora(self, folder: Path) -> None:
        path = folder / "lora.safetensors"
        if not path.is_file():
            raise RecipeError(f"lcm: {folder} has no lora.safetensors (form=lora)")
        deltas, scale, _ = lora.load(path)
        try:
            merged = lora.merged_weights(self.adapter.model, deltas, scale)
        except lora.LoRAError as exc:
            raise RecipeError(f"lcm: {exc}") from None
        for module, weight in merged:
            self._replace(module, "weight", weight)

    def _swap_weights(self, folder: Path) -> None:
        from safetensors.torch import load_file

        model = self.adapter.model
        files = sorted(folder.glob("*/diffusion_pytorch_model.safetensors"))
        if not files:
            raise RecipeError(f"lcm: {folder} has no <denoiser>/diffusion_pytorch_model.safetensors (form=full)")
        weights = load_file(str(files[0]))
        current = dict(model.named_parameters())
        if set(weights) != set(current):
            raise RecipeError(f"lcm: the student in {folder} has other layers than this model "
                              f"({len(set(weights) ^ set(current))} names differ)")
        for name, tensor in weights.items():
            module, attr = split_name(model, name)
            old = current[name]
            if tensor.shape != old.shape:
                raise RecipeError(f"lcm: {name} is {tuple(tensor.shape)} in the student, {tuple(old.shape)} here")
            self._replace(module, attr, tensor.to(old.device, old.dtype))

    def apply(self, pipe: Any, ctx: Any) -> None:
        from diffusers import LCMScheduler

        from effdiff.methods.solvers.schedulers import refuse_flow_matching

        refuse_flow_matching(self.name, pipe)
        folder = self._folder(pipe)
        record_path = folder / RECORD
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        self._check_teacher(folder, record)
        if self.values["form"] == "lora":
            self._merge_lora(folder)
        else:
            self._swap_weights(folder)
        grid = record.get("config", {}).get("ddim_steps", 50)
        self.patches.attr(pipe, "scheduler", LCMScheduler.from_config(pipe.scheduler.config,
                                                                      original_inference_steps=grid))
        self.source = str(folder)

    def prepare_call(self, arguments: dict[str, Any], explicit: frozenset[str]) -> None:
        if "num_inference_steps" not in explicit:
            arguments["num_inference_steps"] = self.values["steps"]
        if "guidance_scale" not in explicit:
            arguments["guidance_scale"] = 1.0

    def describe(self) -> str:
        source = getattr(self, "source", "")
        return super().describe() + (f" from {source}" if source else "")
