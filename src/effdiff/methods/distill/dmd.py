"""``dmd``: sample with a generator trained by distribution matching distillation, in one call an image.

``effdiff distill MODEL --method dmd`` writes it beside the model (``distill/dmd-lora/``, or ``distill/dmd/``
with ``--full``). It samples with diffusers' DDIMScheduler on the teacher's noise schedule, one trailing step
from pure noise — the very step its training differentiated through (``effdiff.distill.dmd``) — and guidance 1:
the teacher's CFG was folded into the real score it was matched to, so the image costs one call.

``path=`` may also name a DMD2 LoRA published for diffusers (tianweiy/DMD2's ``dmd2_sdxl_4step_lora_fp16``,
downloaded beforehand; read like LCM-LoRAs, ``effdiff.distill.published``) with ``steps=`` its step count. DMD2's
multi-step generators predict a clean image at each of T−1, T−1−T/N, … and re-noise it to the next; diffusers'
``LCMScheduler`` over an N-step original grid takes exactly those timesteps (999, 749, 499, 249 for 4), so no
``timesteps=`` argument is needed and any pipeline runs it.
"""

from __future__ import annotations

from typing import Any

from effdiff.distill.published import is_published
from effdiff.methods.distill.student import FORM, PATH, StudentMethod
from effdiff.registry import Paper, Param, RecipeError

DMD = Paper("One-step Diffusion with Distribution Matching Distillation", "2311.18828", "CVPR 2024")
DMD2 = Paper("Improved Distribution Matching Distillation for Fast Image Synthesis", "2405.14867", "NeurIPS 2024")


class DistributionMatching(StudentMethod):
    """One-step sampling with a DMD generator.

    Paper: One-step Diffusion with Distribution Matching Distillation (Yin et al., arXiv 2311.18828): the
    generator is trained so that the difference of the teacher's guided score and a critic's score, both on its
    re-noised images, vanishes (DMD1 adds a regression onto the teacher's noise → image pairs); the default
    training, five critic updates a generator step and no regression, and the published multi-step LoRAs follow
    DMD2 (Yin et al., arXiv 2405.14867).
    """

    name = "dmd"
    paper = DMD
    also = (DMD2,)
    summary = "distribution-matching generator (DMD/DMD2): one call an image (a published DMD2 LoRA: its steps), no CFG"
    params = {"steps": Param(int, 1, 1, 8, help="1 for a generator effdiff distill trained; a published DMD2 "
                                                "LoRA's own step count (4 for dmd2_sdxl_4step_lora)"),
              "form": FORM, "path": PATH}
    exclusive = ("scheduler", "denoiser weights")
    decides = frozenset({"num_inference_steps", "guidance_scale"})
    student_kind = "DMD generator"
    reads_published = True

    def apply(self, pipe: Any, ctx: Any) -> None:
        from diffusers import LCMScheduler

        from effdiff.methods.solvers.schedulers import refuse_flow_matching

        refuse_flow_matching(self.name, pipe)
        folder = self.student_folder(pipe)
        self.student_steps = self.values["steps"]
        if is_published(folder):
            self.load_published(pipe, folder)
            self.patches.attr(pipe, "scheduler", LCMScheduler.from_config(
                pipe.scheduler.config, original_inference_steps=self.student_steps))
            return
        if self.student_steps != 1:
            raise RecipeError(f"{self.name}: a generator from effdiff distill samples in 1 step, not "
                              f"{self.student_steps}; steps=N is for a published DMD2 LoRA (path=)")
        self.load_student(folder)
        self.use_trailing_ddim(pipe)

    def prepare_call(self, arguments: dict[str, Any], explicit: frozenset[str]) -> None:
        steps = self.student_steps
        if "num_inference_steps" in explicit and arguments["num_inference_steps"] != steps:
            raise RecipeError(f"{self.name}: the generator samples in {steps} step{'s' * (steps > 1)} (it was "
                              f"trained for {'those' if steps > 1 else 'that step'} only), not "
                              f"{arguments['num_inference_steps']}")
        arguments["num_inference_steps"] = steps
        if "guidance_scale" not in explicit:
            arguments["guidance_scale"] = 1.0
