"""Faster Diffusion: skip the U-Net encoder at non-key steps; the decoder reuses the key step's encoder features."""

from __future__ import annotations

from typing import Any

import torch

from effdiff.context import StepContext
from effdiff.methods.cache.base import CacheMethod, Forward, refuse
from effdiff.registry import Paper, Param, RecipeError

FASTER = Paper("Faster Diffusion: Rethinking the Role of the Encoder for Diffusion Model Inference", "2312.09608",
               "NeurIPS 2024")
# The paper's non-uniform key steps for 50 DDIM steps (its code's "50ls"): dense while the image forms, then sparse.
PAPER_KEYS_50 = (0, 1, 2, 3, 5, 10, 15, 25, 35)


def parse_keys(text: str) -> list[int]:
    """``"0|1|2|5"`` (``,`` is the recipe separator, so ``|`` or ``;`` separate) -> sorted step indices."""
    try:
        keys = sorted({int(part) for part in text.replace(";", "|").split("|") if part.strip()})
    except ValueError:
        raise RecipeError(f"faster: keys must be '|'-separated step indices like 0|1|2|5, got {text!r}") from None
    if not keys or keys[0] < 0:
        raise RecipeError(f"faster: keys must be non-negative step indices, got {text!r}")
    return keys


def key_steps(total: int, schedule: str, interval: int, keys: list[int] | None = None) -> set[int]:
    """Steps (0-based, over the steps actually run) that compute the encoder; step 0 always does.

    ``uniform``: every ``interval``-th step. ``nonuniform``: the paper's 50-step list scaled to ``total``
    steps. ``keys``, when given, is used as is (indices past the end are ignored).
    """
    if keys is not None:
        chosen = set(keys)
    elif schedule == "uniform":
        chosen = set(range(0, total, interval))
    else:
        chosen = {round(k * total / 50) for k in PAPER_KEYS_50}
    return {0} | {k for k in chosen if k < total}


class FasterDiffusion(CacheMethod):
    """Encoder propagation: the U-Net's encoder runs only at key steps; the decoder reuses its features.

    Paper: Li et al., "Faster Diffusion: Rethinking the Role of the Encoder for Diffusion Model
    Inference" (arXiv 2312.09608, NeurIPS 2024). The encoder (``conv_in``, the down blocks and the mid
    block) changes little from step to step, the decoder a lot. At a key step the whole U-Net runs and
    the encoder's outputs (every skip feature and the mid block's output) are kept; at the other steps
    ``conv_in``, the down blocks and the mid block return the kept outputs and only the time embedding,
    the up blocks and ``conv_out`` run, with the current timestep. Key steps follow the paper's uniform
    (every ``interval`` steps) or non-uniform schedule (its 50-step list 0,1,2,3,5,10,15,25,35, scaled
    to other step counts), or ``keys``; steps are counted over the steps actually run, so img2img
    starts with a key step. ``noise`` > 0 adds the paper's prior noise injection: ``noise`` times the
    call's initial latent is added to the sample before every solver step whose timestep is below
    ``noise_below`` of the training range (paper: 0.003 and 0.5), to keep texture. Not implemented:
    the paper's parallel decoding of several non-key steps in one batch (it needs the pipeline's loop,
    not the denoiser, to change). ``interval=1`` computes the encoder every step: bit-identical.
    """

    name = "faster"
    examples = {"noop": "faster:schedule=uniform,interval=1", "skips": "faster:schedule=uniform,interval=2"}
    backbones = frozenset({"unet"})
    paper = FASTER
    summary = "encoder propagation: skip the U-Net encoder at non-key steps, reuse its features in the decoder"
    params = {
        "schedule": Param(str, "nonuniform", choices=("nonuniform", "uniform"),
                          help="key steps: the paper's non-uniform list, or every `interval` steps"),
        "interval": Param(int, 2, 1, 1000, help="uniform schedule: the encoder runs every `interval` steps",
                          search=(2, 5)),
        "keys": Param(str, "", help="explicit key steps, '|'-separated (e.g. 0|1|2|5|10); overrides schedule"),
        "noise": Param(float, 0.0, 0.0, 1.0, help="prior noise injection weight (paper: 0.003; 0 = off)"),
        "noise_below": Param(float, 0.5, 0.0, 1.0, help="inject at timesteps below this fraction of the range"),
    }

    def __init__(self, **values: Any) -> None:
        super().__init__(**values)
        self.keys = parse_keys(self.values["keys"]) if self.values["keys"].strip() else None

    def setup(self, pipe: Any) -> None:
        unet = self.adapter.model
        parts = [getattr(unet, "conv_in", None), getattr(unet, "mid_block", None)]
        downs = getattr(unet, "down_blocks", None)
        if any(p is None for p in parts) or not downs or not getattr(unet, "up_blocks", None):
            raise refuse(self.name, f"{type(unet).__name__} has no conv_in / down / mid / up blocks to split into "
                                    "encoder and decoder")
        encoder = [unet.conv_in, *downs, unet.mid_block]
        for key, module in enumerate(encoder):
            self.patch(module, lambda inner, key=key: self._encoder_part(key, inner))
        self._pipe = pipe
        self._initial: torch.Tensor | None = None
        if self.values["noise"] > 0:
            self.patches.call(self._ctx.wrap_step(self._inject_noise))

    def begin(self, state: dict[str, Any], ctx: StepContext) -> None:
        if state.get("total") != ctx.total_steps:
            state["total"] = ctx.total_steps
            v = self.values
            state["keys"] = key_steps(ctx.total_steps, v["schedule"], v["interval"], self.keys) \
                if ctx.total_steps else None
        keys = state["keys"]
        due = ctx.step_index % self.values["interval"] == 0 if keys is None else ctx.step_index in keys
        state["key"] = due or "outputs" not in state
        state.setdefault("outputs", {})
        self.count(not state["key"])

    def _encoder_part(self, key: int, inner: Forward) -> Forward:
        def forward(*args: Any, **kwargs: Any) -> Any:
            state = self.current
            if state.get("key", True):
                out = inner(*args, **kwargs)
                state.setdefault("outputs", {})[key] = out
                return out
            return state["outputs"][key]

        return forward

    # --- prior noise injection: a step filter --------------------------------------------------------------
    def _inject_noise(self, call_next: Any, args: tuple, kwargs: dict) -> Any:
        """Add ``noise`` x (the call's initial sample) before each late solver step (the paper's z_T injection)."""
        args, kwargs = list(args), dict(kwargs)
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        sample = args[2] if len(args) > 2 else kwargs["sample"]
        if self._initial is None:
            self._initial = sample
        below = self.values["noise_below"] * float(self._pipe.scheduler.config.get("num_train_timesteps", 1000))
        if float(timestep) < below:
            sample = sample + self.values["noise"] * self._initial
            if len(args) > 2:
                args[2] = sample
            else:
                kwargs["sample"] = sample
        return call_next(*args, **kwargs)

    def _reset(self) -> None:
        super()._reset()
        self._initial = None  # a new call: a new initial sample
