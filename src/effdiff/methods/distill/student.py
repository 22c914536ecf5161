"""What every distilled-student method shares: finding the student beside the model, checking it was made from
these weights, and putting its weights in (a LoRA merged, or a full student's tensors swapped) through the undo
log, so ``remove()`` gives the teacher back bit for bit and a merged LoRA costs nothing per step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from effdiff.distill import lora
from effdiff.distill.published import is_published
from effdiff.distill.store import RECORD, find_student, given_folder, make_command
from effdiff.patches import split_name
from effdiff.registry import FAMILIES, Method, Param, RecipeError, all_methods, refusal

FORM = Param(str, "lora", choices=("lora", "full"), help="a LoRA merged into the weights, or a full student")
PATH = Param(str, "", help="a student folder written by effdiff distill (default: the one beside the model); "
                           "for lcm and dmd also a LoRA published for diffusers (file, or folder holding one)")


class StudentMethod(Method):
    """Base of the ``distill`` family's methods; a subclass names what it calls its student (``student_kind``)
    and applies its scheduler, embedding and call arguments after ``load_student``."""

    tried_by_tune = True  # a trained student: a candidate even where no knob is searched

    family = "distill"
    after = ("solver",)
    before = tuple(f for f in FAMILIES if f not in ("solver", "distill"))
    student_kind: ClassVar[str] = "student"
    reads_published: ClassVar[bool] = False  # path= may name a LoRA published for diffusers (LCM-LoRA, DMD2)

    def student_folder(self, pipe: Any) -> Path:
        """The folder of this recipe's student: ``path=``, else the one beside the model (refused, with the
        command that trains it, when there is none)."""
        form = self.values["form"]
        given = Path(self.values["path"]).expanduser()
        if self.values["path"] and is_published(given):
            if not self.reads_published or form != "lora":
                readers = " or ".join(sorted(name for name, method in all_methods().items()
                                             if getattr(method, "reads_published", False)))
                raise RecipeError(f"{self.name}: {given} is a LoRA effdiff distill did not write; published LoRAs "
                                  f"load with {readers} (form=lora), students of this method come from effdiff "
                                  "distill")
            return given
        folder = given_folder(self.name, self.values["path"], "distill")
        if folder is not None:
            return folder
        found = find_student(pipe, self.name, form)
        if found is None:
            what = f"{self.student_kind}-LoRA" if form == "lora" else f"fully distilled {self.student_kind}"
            raise RecipeError(f"{self.name}: this model has no {what} yet; make one with "
                              f"`{make_command(pipe, self.name, form)}` (or pass path=FOLDER)")
        return found

    def unavailable(self, pipe: Any) -> str | None:
        return refusal(lambda: self.student_folder(pipe))

    def student_record(self, folder: Path) -> dict[str, Any]:
        """The student's record, checked: made by this method, from these weights."""
        record_path = folder / RECORD
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        self._check_teacher(folder, record)
        return record

    def load_student(self, folder: Path) -> dict[str, Any]:
        """Put the student's weights into the denoiser (undoable); returns its record."""
        record = self.student_record(folder)
        if self.values["form"] == "lora":
            self._merge_lora(folder)
        else:
            self._swap_weights(folder)
        self.source = str(folder)
        return record

    def use_trailing_ddim(self, pipe: Any) -> None:
        """DDIMScheduler on the teacher's noise schedule with trailing timesteps (the first step at T − 1, from
        pure noise): the grid a progressive or rectified-flow student was trained on."""
        from diffusers import DDIMScheduler

        self.patches.attr(pipe, "scheduler", DDIMScheduler.from_config(pipe.scheduler.config,
                                                                       timestep_spacing="trailing"))

    def _check_teacher(self, folder: Path, record: dict[str, Any]) -> None:
        from effdiff.methods.solvers.schedule import model_fingerprint

        made_by = record.get("method")
        if made_by and made_by != self.name:
            raise RecipeError(f"{self.name}: {folder} holds a {made_by!r} student, not a {self.name!r} one")
        expected = record.get("teacher_fingerprint")
        if expected and expected != model_fingerprint(self.adapter.model):
            raise RecipeError(f"{self.name}: the student in {folder} was distilled from other weights than this "
                              f"pipeline's {type(self.adapter.model).__name__} (teacher {record.get('teacher')!r}); "
                              "distill one for these weights")

    def _replace(self, module: nn.Module, attr: str, value: torch.Tensor) -> None:
        self.patches.tensor(module, attr, nn.Parameter(value, requires_grad=False))

    def _merge_lora(self, folder: Path) -> None:
        path = folder / "lora.safetensors"
        if not path.is_file():
            raise RecipeError(f"{self.name}: {folder} has no lora.safetensors (form=lora)")
        deltas, scale, _ = lora.load(path)
        self._merge_deltas(deltas, scale)

    def load_published(self, pipe: Any, path: Path) -> dict[str, Any]:
        """Merge a LoRA published for diffusers (``effdiff.distill.published``) into the denoiser (undoable);
        returns an empty record (such a file says nothing of its teacher: a LoRA made for another architecture
        is refused by its layers' shapes)."""
        from effdiff.adapters import denoiser_attr
        from effdiff.distill.published import read_published

        try:
            deltas = read_published(pipe, path, denoiser_attr(pipe))
        except lora.LoRAError as exc:
            raise RecipeError(f"{self.name}: {exc}") from None
        self._merge_deltas(deltas, 1.0)
        self.source = str(path)
        return {}

    def _merge_deltas(self, deltas: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float) -> None:
        try:
            merged = lora.merged_weights(self.adapter.model, deltas, scale)
        except lora.LoRAError as exc:
            raise RecipeError(f"{self.name}: {exc}") from None
        for module, weight in merged:
            self._replace(module, "weight", weight)

    def _swap_weights(self, folder: Path) -> None:
        from safetensors.torch import load_file

        model = self.adapter.model
        files = sorted(folder.glob("*/diffusion_pytorch_model.safetensors"))
        if not files:
            raise RecipeError(f"{self.name}: {folder} has no <denoiser>/diffusion_pytorch_model.safetensors "
                              "(form=full)")
        weights = load_file(str(files[0]))
        current = dict(model.named_parameters())
        if set(weights) != set(current):
            raise RecipeError(f"{self.name}: the student in {folder} has other layers than this model "
                              f"({len(set(weights) ^ set(current))} names differ)")
        for name, tensor in weights.items():
            module, attr = split_name(model, name)
            old = current[name]
            if tensor.shape != old.shape:
                raise RecipeError(f"{self.name}: {name} is {tuple(tensor.shape)} in the student, "
                                  f"{tuple(old.shape)} here")
            self._replace(module, attr, tensor.to(old.device, old.dtype))

    def describe(self) -> str:
        source = getattr(self, "source", "")
        return super().describe() + (f" from {source}" if source else "")
