"""Depth pruning: which layers to remove, chosen one-shot by the output loss (LAPTOP-Diff), to a MAC budget.

Zhang et al. (LAPTOP-Diff, arXiv 2404.11098) compare criteria for removing U-Net layers and find the simplest
one-shot rule the best: remove the layers whose removal changes the model's *output* least, each scored alone. A
layer's score here is the mean squared change of the denoiser's output, over a calibration batch at timesteps
across the schedule, when that one layer is skipped (``Adapter.removable_layers``: layers whose output has their
input's shape, so the rest runs unchanged). Layers go in order of increasing score until the MACs of a call are
within the budget. ``random`` orders them by a seeded shuffle instead: the naive baseline the paper's choice
must beat.
"""

from __future__ import annotations

import random

import torch
from torch import nn

from effdiff.compress.structure import remove_layers
from effdiff.distill.teacher import Denoiser, alpha_at
from effdiff.patches import PatchLog

ORDERS = ("output", "random")


@torch.no_grad()
def output_loss_scores(model: nn.Module, call: Denoiser, candidates: list[str], images: torch.Tensor,
                       text: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps: int = 8,
                       generator: torch.Generator | None = None) -> dict[str, float]:
    """{layer: mean squared change of the output when only that layer is skipped}, on ``images`` noised to
    ``timesteps`` evenly spaced timesteps (one noise draw)."""
    noise = torch.randn(images.shape, generator=generator).to(images.device, images.dtype)
    grid = torch.linspace(0, len(alphas_cumprod) - 1, timesteps).long().tolist()
    inputs = []
    for step in grid:
        t = torch.full((len(images),), step, device=images.device)
        alpha = alpha_at(alphas_cumprod, t, 1.0)
        inputs.append((alpha.sqrt() * images + (1 - alpha).sqrt() * noise, t))
    reference = [call(x, t, text) for x, t in inputs]
    scores = {}
    for name in candidates:
        log = PatchLog()
        remove_layers(log, model, [name])
        try:
            scores[name] = sum((call(x, t, text) - ref).pow(2).mean().item()
                               for (x, t), ref in zip(inputs, reference, strict=True)) / len(inputs)
        finally:
            log.restore()
    return scores


def removal_order(scores: dict[str, float], order: str, seed: int = 0) -> list[str]:
    """The candidates in the order they are removed: least output change first, or a seeded shuffle."""
    if order == "output":
        return sorted(scores, key=lambda name: (scores[name], name))
    if order == "random":
        names = sorted(scores)
        random.Random(seed).shuffle(names)
        return names
    raise ValueError(f"importance must be one of {', '.join(ORDERS)}, got {order!r}")


def layers_for_budget(model: nn.Module, order: list[str], target: float) -> tuple[list[str], dict[str, float]]:
    """The shortest prefix of ``order`` whose removal brings a call within ``target`` × the MACs, and
    {macs_fraction, params_fraction, layers_removed}; refused when removing every candidate is not enough."""
    from effdiff.compress.prune import call_macs

    if not 0.0 < target < 1.0:
        raise ValueError(f"the MAC target is a fraction of the original's MACs in (0, 1), got {target}")
    full_macs, full_params = call_macs(model), sum(p.numel() for p in model.parameters())
    for count in range(1, len(order) + 1):
        log = PatchLog()
        remove_layers(log, model, order[:count])
        try:
            fraction = call_macs(model) / full_macs
            params = sum(p.numel() for p in model.parameters()) / full_params
        finally:
            log.restore()
        if fraction <= target:
            return order[:count], {"macs_fraction": fraction, "params_fraction": params, "layers_removed": count}
    raise ValueError(f"removing all {len(order)} removable layers of {type(model).__name__} leaves more than "
                     f"{target:.0%} of its MACs; ask for a larger fraction or use diffpruning")
