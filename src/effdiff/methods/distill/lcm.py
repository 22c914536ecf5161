"""``lcm``: sample with a latent consistency student in a few steps and no classifier-free-guidance pass.

The student is trained by ``effdiff distill MODEL --method lcm`` (``effdiff.distill``) and found beside the model
(``student.py``: merged LoRA or swapped weights, undone by ``remove()``), or is a published LCM-LoRA
(``path=`` a diffusers/PEFT/kohya LoRA file such as latent-consistency/lcm-lora-sdv1-5's, downloaded beforehand;
``effdiff.distill.published``). The scheduler becomes diffusers'
``LCMScheduler`` on the teacher's noise schedule, the default steps the recipe's, and the guidance 1 (folded into
the student at training) unless the call sets them.
"""

from __future__ import annotations

from typing import Any

from effdiff.distill.published import is_published
from effdiff.methods.distill.student import FORM, PATH, StudentMethod
from effdiff.registry import Paper, Param

LCM = Paper("Latent Consistency Models: Synthesizing High-Resolution Images with Few-Step Inference",
            "2310.04378", "arXiv 2023")
LCM_LORA = Paper("LCM-LoRA: A Universal Stable-Diffusion Acceleration Module", "2311.05556", "arXiv 2023")
CONSISTENCY = Paper("Consistency Models", "2303.01469", "ICML 2023")


class LatentConsistency(StudentMethod):
    """Few-step sampling with a consistency-distilled student (LCM; LCM-LoRA for the LoRA form).

    Paper: Latent Consistency Models (Luo et al., arXiv 2310.04378); the LoRA form: LCM-LoRA (Luo et al., arXiv
    2311.05556); the objective: Consistency Models (Song et al., arXiv 2303.01469).
    """

    name = "lcm"
    paper = LCM
    also = (LCM_LORA, CONSISTENCY)
    summary = "consistency-distilled student (LCM-LoRA or full): 1-8 steps, no CFG pass"
    params = {"steps": Param(int, 4, 1, 50, help="default num_inference_steps (an explicit call wins)",
                           search=(1, 8)),
              "form": FORM, "path": PATH}
    exclusive = ("scheduler", "denoiser weights")
    decides = frozenset({"num_inference_steps", "guidance_scale"})
    student_kind = "LCM"
    reads_published = True

    def apply(self, pipe: Any, ctx: Any) -> None:
        from diffusers import LCMScheduler

        from effdiff.methods.solvers.schedulers import refuse_flow_matching

        refuse_flow_matching(self.name, pipe)
        folder = self.student_folder(pipe)
        record = self.load_published(pipe, folder) if is_published(folder) else self.load_student(folder)
        grid = record.get("config", {}).get("ddim_steps", 50)
        self.patches.attr(pipe, "scheduler", LCMScheduler.from_config(pipe.scheduler.config,
                                                                      original_inference_steps=grid))

    def prepare_call(self, arguments: dict[str, Any], explicit: frozenset[str]) -> None:
        if "num_inference_steps" not in explicit:
            arguments["num_inference_steps"] = self.values["steps"]
        if "guidance_scale" not in explicit:
            arguments["guidance_scale"] = 1.0
