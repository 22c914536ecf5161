"""A pruned denoiser as a difference from its original: the layers removed (depth pruning), the tensors whose shape
changed and the width attributes diffusers' forwards read (an attention's ``heads``, a resampler's ``channels``, a
layer's ``in_features``).

That difference is what a compressed model is saved as, and how it is put back: into the original denoiser
object, in place, through an undo log, so the adapter, the hooks and the pipeline keep pointing at one module and
``remove()`` restores the original bit for bit. A diffusers ``config.json`` cannot describe uneven widths
(``block_out_channels`` is one number per stage), so the folder holds the weights and this difference instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from effdiff.patches import PatchLog, split_name


def _widths(module: nn.Module) -> dict[str, Any]:
    """A module's plain int and int-tuple attributes (layer widths, head counts, kernel sizes)."""
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and (
        (isinstance(v, int) and not isinstance(v, bool)) or (
            isinstance(v, tuple) and v and all(isinstance(x, int) for x in v)))}


def changed_widths(original: nn.Module, pruned: nn.Module) -> dict[str, dict[str, Any]]:
    """{module name: {attribute: value in ``pruned``}} for every width attribute that pruning changed."""
    before = dict(original.named_modules())
    changes: dict[str, dict[str, Any]] = {}
    for name, module in pruned.named_modules():
        old = _widths(before[name])
        diff = {k: v for k, v in _widths(module).items() if old.get(k) != v}
        if diff:
            changes[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in diff.items()}
    return changes


def put_structure(patches: PatchLog, model: nn.Module, weights: dict[str, torch.Tensor],
                  widths: dict[str, dict[str, Any]]) -> None:
    """Make ``model`` the pruned one: every tensor of ``weights`` replaces its namesake (any shape), every width
    attribute is set, each through ``patches``. Refuses weights for tensors the model does not have."""
    own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    unknown = sorted(set(weights) - set(own))
    if unknown:
        raise ValueError(f"the compressed weights name {len(unknown)} tensors this model does not have "
                         f"(first: {unknown[0]!r}): they were made from another architecture")
    for name, tensor in weights.items():
        module, attr = split_name(model, name)
        old = own[name]
        value = tensor.to(old.device, old.dtype)
        patches.tensor(module, attr, nn.Parameter(value, requires_grad=False) if isinstance(old, nn.Parameter)
                       else value)
    for name, attributes in widths.items():
        module = model.get_submodule(name)
        for attr, value in attributes.items():
            patches.attr(module, attr, tuple(value) if isinstance(value, list) else value)


class SkippedLayer(nn.Module):
    """Stands where a removed layer was: passes its first input on unchanged, in the form the caller unpacks (a
    one-tuple when called with ``return_dict=False``, as diffusers' blocks call their attention models)."""

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return (hidden,) if kwargs.get("return_dict", True) is False else hidden


def remove_layers(patches: PatchLog, model: nn.Module, names: list[str]) -> None:
    """Put a ``SkippedLayer`` where each named layer was, through ``patches``."""
    for name in names:
        patches.module(model, name, SkippedLayer())
