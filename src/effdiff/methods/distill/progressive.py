"""``progressive``: sample with a progressively distilled student in the few steps it was trained for.

``effdiff distill MODEL --method progressive [--steps 1]`` trains rounds of students that halve the steps (8, 4,
2, 1), each saved as ``steps-N`` beside the model; the recipe's ``steps`` picks one. The scheduler becomes
diffusers' ``DDIMScheduler`` on the teacher's noise schedule with trailing timesteps (the grid the student was
trained on), and guidance 1: the first round folded the teacher's CFG into the student, so each step is one call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from effdiff.distill.store import RECORD
from effdiff.methods.distill.student import FORM, PATH, StudentMethod
from effdiff.registry import Paper, Param, RecipeError

PROGRESSIVE = Paper("Progressive Distillation for Fast Sampling of Diffusion Models", "2202.00512", "ICLR 2022")


class ProgressiveDistillation(StudentMethod):
    """Few-step sampling with a student distilled by halving the steps per round.

    Paper: Progressive Distillation for Fast Sampling of Diffusion Models (Salimans & Ho, arXiv 2202.00512); the
    guidance folded in at the first round as in Meng et al. (arXiv 2210.03142).
    """

    name = "progressive"
    paper = PROGRESSIVE
    summary = "progressively distilled student (steps halved per round): 1-8 DDIM steps, no CFG pass"
    params = {"steps": Param(int, 4, 1, 64, help="which round's student (its step count)",
                           search=(1, 4)), "form": FORM,
              "path": PATH}
    exclusive = ("scheduler", "denoiser weights")
    decides = frozenset({"num_inference_steps", "guidance_scale"})
    student_kind = "progressive"

    def _round_folder(self, folder: Path) -> Path:
        """``folder`` itself when it is one round's student, else its ``steps-N`` for the recipe's steps."""
        if (folder / RECORD).is_file():
            return folder
        chosen = folder / f"steps-{self.values['steps']}"
        if not chosen.is_dir():
            have = sorted((int(p.name.split("-")[1]) for p in folder.glob("steps-*")), reverse=True)
            raise RecipeError(f"{self.name}: no {self.values['steps']}-step student in {folder} (it has "
                              f"{', '.join(map(str, have)) or 'none'}); train down to it with `effdiff distill "
                              f"MODEL --method progressive --steps {self.values['steps']}`")
        return chosen

    def apply(self, pipe: Any, ctx: Any) -> None:
        from effdiff.methods.solvers.schedulers import refuse_flow_matching

        refuse_flow_matching(self.name, pipe)
        record = self.load_student(self._round_folder(self.student_folder(pipe)))
        self.student_steps = int(record.get("steps", self.values["steps"]))
        self.use_trailing_ddim(pipe)

    def prepare_call(self, arguments: dict[str, Any], explicit: frozenset[str]) -> None:
        if "num_inference_steps" in explicit and arguments["num_inference_steps"] != self.student_steps:
            raise RecipeError(f"{self.name}: this student samples in {self.student_steps} steps, not "
                              f"{arguments['num_inference_steps']}; pick another round with progressive:steps=N")
        arguments["num_inference_steps"] = self.student_steps
        if "guidance_scale" not in explicit:
            arguments["guidance_scale"] = 1.0
