"""Low-rank weight deltas (LoRA) of a denoiser's linear and convolution layers: trained through forward hooks,
saved as a small safetensors file, and merged into the weights for inference.

Why our own and not peft: the deltas must be merged through effdiff's undo log (``PatchLog.tensor``), so
``remove()`` puts the very original weight tensors back, and a merged LoRA costs nothing per step (a hooked
one adds two matmuls to every layer, which on the bundled models is a quarter of the step time). The file
layout is plain: ``<layer>.down`` and ``<layer>.up`` per layer, the rank and scale in the metadata.

Paper: LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., arXiv 2106.09685).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

LAYER_TYPES = (nn.Linear, nn.Conv2d)


class LoRAError(ValueError):
    """A LoRA file does not fit the model it is applied to; the message names the layer."""


class LowRankDelta(nn.Module):
    """``scale · up(down(x))`` for one layer: ``down`` has the layer's kernel, stride and padding, ``up`` is 1×1.

    ``up`` starts at zero, so an attached delta leaves the model's output unchanged until it is trained.
    """

    def __init__(self, layer: nn.Module, rank: int, scale: float, generator: torch.Generator) -> None:
        super().__init__()
        weight = layer.weight
        out_features, in_features = weight.shape[0], weight.shape[1]
        kernel = tuple(weight.shape[2:])
        self.conv = isinstance(layer, nn.Conv2d)
        self.stride, self.padding = (layer.stride, layer.padding) if self.conv else (1, 0)
        bound = 1 / math.sqrt(in_features * math.prod(kernel))
        down = (torch.rand((rank, in_features, *kernel), generator=generator) * 2 - 1) * bound
        self.down = nn.Parameter(down.to(weight.device, weight.dtype))
        self.up = nn.Parameter(torch.zeros((out_features, rank, *(1,) * len(kernel)),
                                           device=weight.device, dtype=weight.dtype))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv:
            hidden = nn.functional.conv2d(x, self.down, stride=self.stride, padding=self.padding)
            return nn.functional.conv2d(hidden, self.up) * self.scale
        return nn.functional.linear(nn.functional.linear(x, self.down), self.up) * self.scale


def merged_weight(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """``weight + scale · up @ down`` (conv kernels included), in one float32 GEMM on the weight's device, returned
    in the weight's dtype. One ``addmm`` rather than a dense delta added afterwards: merging is memory-bound (an SD
    1.5 LCM-LoRA, rank 64 on 278 layers, touches all 860 M weights), and the delta-then-add version in float64
    took 21 s on two cores."""
    rank = down.shape[0]
    up = up.reshape(up.shape[0], rank).to(weight.device, torch.float32) * scale
    down = down.reshape(rank, -1).to(weight.device, torch.float32)
    flat = weight.detach().reshape(up.shape[0], -1).float()
    return torch.addmm(flat, up, down).reshape(weight.shape).to(weight.dtype)


def target_layers(model: nn.Module, rank: int, exclude: str = "") -> list[tuple[str, nn.Module]]:
    """Every linear and convolution layer wider than ``rank`` on both sides: a delta of rank ≥ a side would be
    a dense one (this leaves out the pixel/patch input and output projections, which have 1-4 channels).
    ``exclude``: a regular expression; layers whose name it matches (``re.search``) stay frozen."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    return [(name, m) for name, m in layers if min(m.weight.shape[0], m.weight.shape[1]) > rank
            and not (exclude and re.search(exclude, name))]


def attach(model: nn.Module, rank: int, seed: int, alpha: float | None = None, exclude: str = "") -> nn.ModuleDict:
    """Trainable deltas on ``model``'s target layers, applied by forward hooks; returns them by layer name (dots
    become ``/`` in the ModuleDict). The base weights stay frozen."""
    generator = torch.Generator().manual_seed(seed)
    scale = (alpha if alpha is not None else rank) / rank
    deltas = nn.ModuleDict()
    for name, layer in target_layers(model, rank, exclude):
        delta = LowRankDelta(layer, rank, scale, generator)
        deltas[name.replace(".", "/")] = delta
        layer.register_forward_hook(lambda _m, args, out, d=delta: out + d(args[0]))
    return deltas


def save(deltas: nn.ModuleDict, path: Path, metadata: dict[str, str]) -> Path:
    """``<layer>.down`` / ``<layer>.up`` tensors plus ``rank`` and ``scale`` in the safetensors metadata."""
    tensors: dict[str, torch.Tensor] = {}
    first = next(iter(deltas.values()))
    for key, delta in deltas.items():
        layer = key.replace("/", ".")
        tensors[f"{layer}.down"] = delta.down.detach().float().cpu().contiguous()
        tensors[f"{layer}.up"] = delta.up.detach().float().cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={**metadata, "rank": str(first.down.shape[0]), "scale": str(first.scale)})
    return path


def load(path: Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, dict[str, str]]:
    """(layer -> (down, up), scale, metadata) from a file written by ``save``."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:  # safetensors raises several types for a corrupt file
        raise LoRAError(f"{path} is not a readable LoRA safetensors file ({exc})") from exc
    layers = sorted({key.rsplit(".", 1)[0] for key in tensors})
    missing = [layer for layer in layers if f"{layer}.down" not in tensors or f"{layer}.up" not in tensors]
    if missing or "scale" not in metadata:
        raise LoRAError(f"{path}: expected '<layer>.down' and '<layer>.up' tensors and a 'scale' entry in the "
                        f"metadata (written by effdiff.distill.lora.save); {missing[:1] or 'scale'} is missing")
    return {layer: (tensors[f"{layer}.down"], tensors[f"{layer}.up"]) for layer in layers}, float(
        metadata["scale"]), metadata


def merged_weights(model: nn.Module, deltas: dict[str, tuple[torch.Tensor, torch.Tensor]],
                   scale: float) -> Iterable[tuple[nn.Module, torch.Tensor]]:
    """(layer, its weight with the delta added, in the weight's dtype and device) for every layer of the file;
    a layer the model lacks or whose shape differs is refused by name before anything is yielded."""
    merged = []
    for layer, (down, up) in deltas.items():
        try:
            module = model.get_submodule(layer)
        except AttributeError:
            raise LoRAError(f"the LoRA has a delta for {layer!r}, which this model does not have") from None
        weight = module.weight
        shape = (up.shape[0], *down.shape[1:])
        if shape != tuple(weight.shape):
            raise LoRAError(f"the LoRA's delta for {layer!r} has shape {shape}, the layer's weight "
                            f"{tuple(weight.shape)}: it was trained for another model")
        merged.append((module, merged_weight(weight, down, up, scale)))
    return merged


def parameter_count(deltas: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> int:
    return sum(down.numel() + up.numel() for down, up in deltas.values())
