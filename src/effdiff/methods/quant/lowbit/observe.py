"""Calibration runs for the simulated low-bit methods: which layers, which prompts, what each layer saw.

Calibration data come from the pipeline itself (as Q-Diffusion and PTQ4DM build theirs): a few prompts are
sampled with the full-precision model, and hooks on every target layer see its real inputs at *every*
denoising step, so statistics span all timesteps rather than one. The solver in the recipe (if any) is
already active, so calibration sees the same timesteps as deployment.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from effdiff.adapters import Adapter
from effdiff.calling import call_with, conditions_for


def calibration_prompts(pipe: Any, n: int) -> list[Any]:
    """``n`` calibration conditions, kept apart from the pipeline's evaluation prompts where it has its own."""
    return conditions_for(pipe, n, "calibration")


def run_pipeline(pipe: Any, conditions: list[Any], seed: int, steps: int = 0) -> None:
    """One pipeline call over the calibration conditions at the pipeline's guidance; ``steps`` 0 leaves the
    step count to the pipeline (or to the recipe's solver)."""
    kwargs: dict[str, Any] = {"generator": torch.Generator("cpu").manual_seed(seed),
                              "output_type": "latent" if getattr(pipe, "vae", None) is not None else "pt"}
    if steps:
        kwargs["num_inference_steps"] = steps
    with torch.no_grad():
        call_with(pipe, conditions, **kwargs)


def target_layers(adapter: Adapter) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` and ungrouped ``nn.Conv2d`` of the denoiser, by name."""
    return {name: m for name, m in adapter.model.named_modules()
            if isinstance(m, nn.Linear) or isinstance(m, nn.Conv2d) and m.groups == 1}


def split_points(adapter: Adapter) -> tuple[dict[str, int], Callable[[], None]]:
    """Hooks that find, for each U-Net up-block resnet, where its concat input switches from the upsampled
    features to the skip features; the returned dict fills during the next forward (names of conv1 and
    conv_shortcut -> channel index). DiTs have no concat: the dict stays empty."""
    found: dict[str, int] = {}
    handles = []
    model_names = {m: n for n, m in adapter.model.named_modules()}
    for ref in adapter.blocks():
        if ref.role != "up" or not hasattr(ref.module, "resnets"):
            continue

        def hook(block: nn.Module, args: tuple, kwargs: dict) -> None:
            skips = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)
            if not skips:
                return
            for i, resnet in enumerate(block.resnets):
                if i >= len(skips):
                    break
                split = resnet.in_channels - skips[-(i + 1)].shape[1]
                for child in ("conv1", "conv_shortcut"):
                    layer = getattr(resnet, child, None)
                    if isinstance(layer, nn.Conv2d) and 0 < split < layer.in_channels:
                        found[model_names[layer]] = split

        handles.append(ref.module.register_forward_pre_hook(hook, with_kwargs=True))
    return found, lambda: [h.remove() for h in handles]


class LayerInputs:
    """Calls ``visit(name, module, x)`` with every input of every target layer while active."""

    def __init__(self, layers: dict[str, nn.Module], visit: Callable[[str, nn.Module, torch.Tensor], None]) -> None:
        self.layers, self.visit = layers, visit
        self.order: list[str] = []
        self._handles: list[Any] = []

    def __enter__(self) -> LayerInputs:
        for name, module in self.layers.items():
            def hook(mod: nn.Module, args: tuple, name: str = name) -> None:
                if name not in self.order:
                    self.order.append(name)
                self.visit(name, mod, args[0])

            self._handles.append(module.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def io_layers(adapter: Adapter, order: list[str], layers: dict[str, nn.Module]) -> set[str]:
    """The input and output layers (kept in float, as PTQ4DM and Q-Diffusion keep them): ``conv_in`` / the
    patch embedding (else the first layer run) and the last layer run (``conv_out`` / ``proj_out``)."""
    keep = {order[-1]} if order else set()
    for name in ("conv_in", "pos_embed.proj", "x_embedder.proj"):
        if name in layers:
            keep.add(name)
            break
    else:
        if order:
            keep.add(order[0])
    return keep
