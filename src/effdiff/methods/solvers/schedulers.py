"""diffusers schedulers as ``solver`` methods.

Applying one swaps ``pipe.scheduler`` for ``Scheduler.from_config(original.config, ...)`` and makes
the recipe's ``steps`` the *default* ``num_inference_steps``: a call that passes
``num_inference_steps`` explicitly keeps it (the user's explicit choice wins over the recipe's).
``remove`` puts the original scheduler object back. No scheduler is rewritten here.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar

from effdiff.registry import FAMILIES, Method, Paper, Param, RecipeError

DDIM = Paper("Denoising Diffusion Implicit Models", "2010.02502", "ICLR 2021")
PNDM = Paper("Pseudo Numerical Methods for Diffusion Models on Manifolds", "2202.09778", "ICLR 2022")
DPM = Paper("DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in Around 10 Steps",
            "2206.00927", "NeurIPS 2022")
DPMPP = Paper("DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
              "2211.01095", "arXiv 2022")
UNIPC = Paper("UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models",
              "2302.04867", "NeurIPS 2023")
DEIS = Paper("Fast Sampling of Diffusion Models with Exponential Integrator", "2204.13902", "ICLR 2023")
EDM = Paper("Elucidating the Design Space of Diffusion-Based Generative Models", "2206.00364", "NeurIPS 2022")


@dataclass(frozen=True)
class SchedulerSpec:
    """One solver: the diffusers class, config overrides, and the paper it comes from."""

    name: str
    scheduler: str
    paper: Paper
    summary: str
    config: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()  # the names users type for it elsewhere (A1111, ComfyUI, papers)


SCHEDULERS: tuple[SchedulerSpec, ...] = (
    SchedulerSpec("ddim", "DDIMScheduler", DDIM, "deterministic DDIM sampler"),
    SchedulerSpec("pndm", "PNDMScheduler", PNDM, "pseudo linear multistep (PLMS)", {"skip_prk_steps": True}),
    SchedulerSpec("dpm2s", "DPMSolverSinglestepScheduler", DPM, "DPM-Solver-2, singlestep",
                  {"solver_order": 2, "algorithm_type": "dpmsolver++"}),
    SchedulerSpec("dpm3s", "DPMSolverSinglestepScheduler", DPM, "DPM-Solver-3, singlestep",
                  {"solver_order": 3, "algorithm_type": "dpmsolver++"}),
    SchedulerSpec("dpmpp2m", "DPMSolverMultistepScheduler", DPMPP, "DPM-Solver++ 2M, multistep",
                  {"solver_order": 2, "algorithm_type": "dpmsolver++"}, ("dpmpp", "dpm++", "dpm++2m", "dpmpp_2m")),
    SchedulerSpec("dpmpp3m", "DPMSolverMultistepScheduler", DPMPP, "DPM-Solver++ 3M, multistep",
                  {"solver_order": 3, "algorithm_type": "dpmsolver++"}, ("dpm++3m", "dpmpp_3m")),
    SchedulerSpec("dpmpp-sde", "DPMSolverMultistepScheduler", DPMPP,
                  "SDE-DPM-Solver++ 2M (stochastic; no torchsde needed)",
                  {"solver_order": 2, "algorithm_type": "sde-dpmsolver++"}, ("dpm++sde", "dpmpp_sde", "dpm++-sde")),
    SchedulerSpec("unipc", "UniPCMultistepScheduler", UNIPC, "UniPC predictor-corrector"),
    SchedulerSpec("deis", "DEISMultistepScheduler", DEIS, "DEIS exponential integrator"),
    SchedulerSpec("euler", "EulerDiscreteScheduler", EDM, "Euler (k-diffusion sigmas)"),
    SchedulerSpec("euler-a", "EulerAncestralDiscreteScheduler", EDM, "Euler ancestral (stochastic)", {},
                  ("euler_a", "euler-ancestral")),
    SchedulerSpec("heun", "HeunDiscreteScheduler", EDM, "Heun 2nd order (2 denoiser calls per step)"),
)


def scheduler_class(name: str) -> type:
    import diffusers

    return getattr(diffusers, name)


def supports_karras(scheduler: str) -> bool:
    return "use_karras_sigmas" in inspect.signature(scheduler_class(scheduler).__init__).parameters


def is_flow_matching(scheduler: Any) -> bool:
    """Whether ``scheduler`` integrates a rectified flow (Flux, SD3) rather than a DDPM noise schedule."""
    config = getattr(scheduler, "config", None) or {}
    return (type(scheduler).__name__.startswith("FlowMatch") or bool(config.get("use_flow_sigmas"))
            or config.get("prediction_type") == "flow_prediction")


def refuse_flow_matching(method: str, pipe: Any) -> None:
    """A DDPM-family solver on a flow-matching pipeline crashes mid-call or samples the wrong ODE: refuse it."""
    if is_flow_matching(pipe.scheduler):
        raise RecipeError(
            f"{method}: {type(pipe).__name__} samples a rectified flow with {type(pipe.scheduler).__name__}, and "
            "effdiff's solvers assume a DDPM noise schedule; keep the pipeline's scheduler (cache methods still apply)"
        )


def scales_initial_noise(pipe: Any) -> bool:
    """Whether the pipeline's code applies ``init_noise_sigma`` (or ``add_noise``) to its starting latents.

    DiTPipeline does neither, so a scheduler whose initial sigma is not 1 (Euler, Heun) would start from noise
    at the wrong scale. Unknown (no source available) counts as yes.
    """
    from diffusers import DiffusionPipeline

    seen = False
    for cls in type(pipe).__mro__:
        if not issubclass(cls, DiffusionPipeline) or cls is DiffusionPipeline:
            continue
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        seen = True
        if "init_noise_sigma" in source or "add_noise" in source:
            return True
    return not seen


class SchedulerMethod(Method):
    """Base of the scheduler-swap methods (one subclass per ``SchedulerSpec``)."""

    family = "solver"
    before = tuple(f for f in FAMILIES if f != "solver")
    exclusive = ("scheduler",)
    spec_: ClassVar[SchedulerSpec]

    def apply(self, pipe: Any, ctx: Any) -> None:
        refuse_flow_matching(self.name, pipe)
        overrides = dict(self.spec_.config)
        if self.values.get("karras"):
            overrides["use_karras_sigmas"] = True
        scheduler = scheduler_class(self.spec_.scheduler).from_config(pipe.scheduler.config, **overrides)
        sigma = float(scheduler.init_noise_sigma)
        if sigma != 1.0 and not scales_initial_noise(pipe):
            raise RecipeError(
                f"{self.name}: {type(pipe).__name__} never scales its initial noise by the scheduler's "
                f"init_noise_sigma ({sigma:.3g} for {self.spec_.scheduler}), so it would start from the wrong noise "
                "level; use a solver whose initial sigma is 1 (ddim, pndm, dpm*, unipc, deis)"
            )
        self.patches.attr(pipe, "scheduler", scheduler)

    def prepare_call(self, arguments: dict[str, Any], explicit: frozenset[str]) -> None:
        if "num_inference_steps" not in explicit:
            arguments["num_inference_steps"] = self.values["steps"]


def _make(spec: SchedulerSpec) -> type[SchedulerMethod]:
    params = {"steps": Param(int, 20, 1, 1000, help="default num_inference_steps (an explicit call wins)",
                              search=(4, 50))}
    if supports_karras(spec.scheduler):
        params["karras"] = Param(bool, False, help="Karras et al. (2022) sigma spacing",
                                  search=(False, True))
    doc = (f"{spec.summary}: diffusers ``{spec.scheduler}``.\n\n"
           f"Paper: {spec.paper.title} (arXiv {spec.paper.arxiv}, {spec.paper.venue}).")
    cls_name = "".join(part.capitalize() for part in spec.name.replace("-", "_").split("_")) + "Solver"
    return type(cls_name, (SchedulerMethod,), {
        "__doc__": doc, "__module__": __name__, "name": spec.name, "paper": spec.paper,
        "summary": spec.summary, "params": params, "spec_": spec, "aliases": spec.aliases,
    })


SOLVER_CLASSES: dict[str, type[SchedulerMethod]] = {spec.name: _make(spec) for spec in SCHEDULERS}
