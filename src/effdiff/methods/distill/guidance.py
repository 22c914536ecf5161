"""``guidance-distill``: classifier-free guidance at one denoiser call per step, from a w-conditioned student.

The student (``effdiff distill MODEL --method guidance-distill``) is the teacher's weights plus a LoRA (or a full
copy) and a small w embedding added to the timestep embedding (``effdiff.distill.guidance``). Under this method
the pipeline runs without its unconditional half: the caller's ``guidance_scale`` (or the recipe's ``scale``)
becomes the student's w, and the pipeline is told 1, so every step costs one call. The scheduler is untouched,
so any solver, step count, cache or precision method stacks on it. A negative prompt has no effect (there is no
unconditional pass to put it in).
"""

from __future__ import annotations

from typing import Any

import torch

from effdiff.distill.guidance import GuidanceEmbedding, embedding_width
from effdiff.distill.store import GUIDANCE_FILE
from effdiff.methods.distill.student import FORM, PATH, StudentMethod
from effdiff.registry import Paper, Param, RecipeError

GUIDED_DISTILLATION = Paper("On Distillation of Guided Diffusion Models", "2210.03142", "CVPR 2023")


class GuidanceDistillation(StudentMethod):
    """One pass per step at any guidance scale: a student conditioned on w matches the teacher's CFG output.

    Paper: On Distillation of Guided Diffusion Models (Meng et al., arXiv 2210.03142), stage one.
    """

    name = "guidance-distill"
    paper = GUIDED_DISTILLATION
    summary = "w-conditioned student: the CFG output in one pass per step, any solver"
    params = {"scale": Param(float, 4.0, 0.0, 30.0, help="guidance scale w when the call sets none"),
              "form": FORM, "path": PATH}
    exclusive = ("denoiser weights",)
    decides = frozenset({"guidance_scale"})
    student_kind = "guidance-distilled"

    def apply(self, pipe: Any, ctx: Any) -> None:
        from safetensors.torch import load_file

        if self.adapter.guidance_embedded():
            raise RecipeError(f"{self.name}: {type(self.adapter.model).__name__} already takes the guidance scale "
                              "as an input (it is guidance-distilled); pass guidance_scale to the pipeline")
        site = self.adapter.timestep_embedding()
        if site is None:
            raise RecipeError(f"{self.name}: {type(self.adapter.model).__name__} has no shared timestep embedding "
                              "to add the guidance embedding to")
        folder = self.student_folder(pipe)
        self.student_record(folder)
        path = folder / GUIDANCE_FILE
        if not path.is_file():
            raise RecipeError(f"{self.name}: {folder} has no {GUIDANCE_FILE} (is it a guidance-distill student?)")
        _, module = site
        embedding = GuidanceEmbedding(embedding_width(module))
        try:
            embedding.load_state_dict(load_file(str(path)))
        except RuntimeError as exc:
            raise RecipeError(f"{self.name}: {path} does not fit this model's timestep embedding ({exc})") from None
        weight = next(module.parameters())
        self.embedding = embedding.to(weight.device, weight.dtype).requires_grad_(False)
        self.load_student(folder)
        self.patches.hook(self.embedding.attach(module))

    def prepare_call(self, arguments: dict[str, Any], explicit: frozenset[str]) -> None:
        scale = arguments["guidance_scale"] if "guidance_scale" in explicit else self.values["scale"]
        self.embedding.scale = torch.tensor([float(scale)])
        arguments["guidance_scale"] = 1.0

    def remove(self) -> None:
        if hasattr(self, "embedding"):
            self.embedding.scale = None
