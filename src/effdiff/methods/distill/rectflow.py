"""``rectflow``: sample with a rectified-flow student — the reflowed one in a few steps, or the one-step one.

``effdiff distill MODEL --method rectflow`` writes both beside the model (``reflow/`` and ``onestep/``). Both
sample with diffusers' DDIMScheduler on the teacher's noise schedule with trailing timesteps: DDIM's step is
Euler's on the straight paths reflow trains for (``effdiff.distill.rectflow``). Guidance was folded into the
couplings, so each step is one call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from effdiff.distill.store import RECORD
from effdiff.methods.distill.student import FORM, PATH, StudentMethod
from effdiff.registry import Paper, Param, RecipeError

RECTIFIED_FLOW = Paper("Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified Flow",
                       "2209.03003", "ICLR 2023")
INSTAFLOW = Paper("InstaFlow: One Step is Enough for High-Quality Diffusion-Based Text-to-Image Generation",
                  "2309.06380", "ICLR 2024")


class RectifiedFlow(StudentMethod):
    """Few-step sampling with a reflowed student (2-rectified flow), or one step with its distilled student.

    Paper: InstaFlow (Liu et al., arXiv 2309.06380), which reflows a text-to-image diffusion model on its own
    couplings and distils it to one step; the reflow procedure: Flow Straight and Fast (Liu et al., arXiv
    2209.03003).
    """

    name = "rectflow"
    paper = INSTAFLOW
    also = (RECTIFIED_FLOW,)
    summary = "rectified-flow student (InstaFlow): reflowed for few steps, distilled for one; no CFG pass"
    params = {"steps": Param(int, 1, 1, 64, help="sampling steps (1: the one-step student unless stage=reflow)",
                           search=(1, 4)),
              "stage": Param(str, "auto", choices=("auto", "reflow", "onestep"),
                             help="which student: auto takes onestep at 1 step, reflow above"),
              "form": FORM, "path": PATH}
    exclusive = ("scheduler", "denoiser weights")
    decides = frozenset({"num_inference_steps", "guidance_scale"})
    student_kind = "rectified-flow"

    def stage(self) -> str:
        stage = self.values["stage"]
        if stage == "auto":
            return "onestep" if self.values["steps"] == 1 else "reflow"
        if stage == "onestep" and self.values["steps"] != 1:
            raise RecipeError(f"{self.name}: the one-step student samples in 1 step, not {self.values['steps']}; "
                              "use stage=reflow for more")
        return stage

    def _stage_folder(self, folder: Path) -> Path:
        """``folder`` itself when it is one student, else its folder for the recipe's stage."""
        if (folder / RECORD).is_file():
            return folder
        chosen = folder / self.stage()
        if not chosen.is_dir():
            raise RecipeError(f"{self.name}: {folder} has no {chosen.name} student (a run with --reflow-share 1 "
                              "stops after reflow)")
        return chosen

    def apply(self, pipe: Any, ctx: Any) -> None:
        from effdiff.methods.solvers.schedulers import refuse_flow_matching

        refuse_flow_matching(self.name, pipe)
        record = self.load_student(self._stage_folder(self.student_folder(pipe)))
        self.only_steps = 1 if record.get("phase") == "onestep" else None
        self.use_trailing_ddim(pipe)

    def prepare_call(self, arguments: dict[str, Any], explicit: frozenset[str]) -> None:
        steps = arguments["num_inference_steps"] if "num_inference_steps" in explicit else self.values["steps"]
        if self.only_steps and steps != self.only_steps:
            raise RecipeError(f"{self.name}: the one-step student samples in 1 step, not {steps}; use "
                              "rectflow:stage=reflow,steps=N for more")
        arguments["num_inference_steps"] = steps
        if "guidance_scale" not in explicit:
            arguments["guidance_scale"] = 1.0
