"""``dmd``: sample in one step with a generator trained by distribution matching distillation.

``effdiff distill MODEL --method dmd`` writes it beside the model (``distill/dmd-lora/``, or ``distill/dmd/``
with ``--full``). It samples with diffusers' DDIMScheduler on the teacher's noise schedule, one trailing step
from pure noise — the very step its training differentiated through (``effdiff.distill.dmd``) — and guidance 1:
the teacher's CFG was folded into the real score it was matched to, so the image costs one call.
"""

from __future__ import annotations

from typing import Any

from effdiff.methods.distill.student import FORM, PATH, StudentMethod
from effdiff.registry import Paper, RecipeError

DMD = Paper("One-step Diffusion with Distribution Matching Distillation", "2311.18828", "CVPR 2024")
DMD2 = Paper("Improved Distribution Matching Distillation for Fast Image Synthesis", "2405.14867", "NeurIPS 2024")


class DistributionMatching(StudentMethod):
    """One-step sampling with a DMD generator.

    Paper: One-step Diffusion with Distribution Matching Distillation (Yin et al., arXiv 2311.18828): the
    generator is trained so that the difference of the teacher's guided score and a critic's score, both on its
    re-noised images, vanishes, with a regression onto the teacher's noise → image pairs; the optional
    two-time-scale critic updates follow DMD2 (Yin et al., arXiv 2405.14867).
    """

    name = "dmd"
    paper = DMD
    also = (DMD2,)
    summary = "distribution-matching one-step generator (DMD): one call an image, no CFG pass"
    params = {"form": FORM, "path": PATH}
    exclusive = ("scheduler", "denoiser weights")
    decides = frozenset({"num_inference_steps", "guidance_scale"})
    student_kind = "DMD generator"

    def apply(self, pipe: Any, ctx: Any) -> None:
        from effdiff.methods.solvers.schedulers import refuse_flow_matching

        refuse_flow_matching(self.name, pipe)
        self.load_student(self.student_folder(pipe))
        self.use_trailing_ddim(pipe)

    def prepare_call(self, arguments: dict[str, Any], explicit: frozenset[str]) -> None:
        if "num_inference_steps" in explicit and arguments["num_inference_steps"] != 1:
            raise RecipeError(f"{self.name}: the generator samples in 1 step (it was trained for that step "
                              f"only), not {arguments['num_inference_steps']}")
        arguments["num_inference_steps"] = 1
        if "guidance_scale" not in explicit:
            arguments["guidance_scale"] = 1.0
