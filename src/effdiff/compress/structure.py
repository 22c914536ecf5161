"""A pruned denoiser as a difference from its original: the layers removed (depth pruning), the tensors whose shape
changed and the width attributes diffusers' forwards read (an attention's ``heads``, a resampler's ``channels``, a
layer's ``in_features``).

That difference is what a compressed model is saved as, and how it is put back: into the original denoiser
object, in place, through an undo log, so the adapter, the hooks and the pipeline keep pointing at one module and
``remove()`` restores the original bit for bit. A diffusers ``config.json`` cannot describe uneven widths
(``block_out_channels`` is one number per stage), so the folder holds the weights and this difference instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass
class BlockPlan:
    """Whole blocks removed from a denoiser, in the original's module names (BK-SDM's stages and pairs, a DiT's
    transformer blocks): each ``ModuleList`` in ``kept`` shrinks to the listed children, in order; each name in
    ``dropped`` becomes ``None`` (diffusers' forwards skip a missing mid-block or resampler); ``settings`` are
    attributes the forward reads to know the new structure (a U-Net's ``num_upsamplers``). ``features`` pairs a
    teacher layer with the student layer that stands where it stood, for feature distillation.

    Shrinking the containers, rather than leaving pass-through layers, renames what follows (the student's
    ``up_blocks.0`` is the teacher's ``up_blocks.1``) — the layout a model built at the smaller config has, so
    weights load by name and nothing skipped is still called."""

    kept: dict[str, list[int]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    features: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def of(cls, record: dict[str, Any] | None) -> BlockPlan:
        """The plan a compress record holds (none: an empty plan)."""
        record = record or {}
        return cls({k: list(v) for k, v in record.get("kept", {}).items()}, list(record.get("dropped", [])),
                   dict(record.get("settings", {})), [tuple(pair) for pair in record.get("features", [])])

    def renamed(self, name: str) -> str:
        """``name`` (a module of the original) as it is called once the containers in ``kept`` have shrunk."""
        parts = name.split(".")
        for i in range(len(parts) - 1, 0, -1):
            kept = self.kept.get(".".join(parts[:i]))
            if kept is not None and parts[i].isdigit():
                parts[i] = str(kept.index(int(parts[i])))
        return ".".join(parts)


def apply_block_plan(patches: PatchLog, model: nn.Module, plan: BlockPlan) -> None:
    """Make ``model`` the block-removed one, through ``patches``. Every name is looked up before anything
    changes, so nested edits (a stage's pairs, the stage list itself) do not disturb each other."""
    try:
        lists = [(name, split_name(model, name), model.get_submodule(name), kept) for name, kept in plan.kept.items()]
        dropped = [(*split_name(model, name), model.get_submodule(name)) for name in plan.dropped]
        settings = [(model.get_submodule(name) if name else model, values) for name, values in plan.settings.items()]
    except AttributeError as exc:
        raise ValueError(f"the block plan names a module this model does not have ({exc})") from None
    for name, _, container, kept in lists:
        if not isinstance(container, nn.ModuleList) or any(not 0 <= i < len(container) for i in kept):
            raise ValueError(f"the block plan keeps {kept} of {name!r}, which has no such children")
    for _, (parent, attr), container, kept in lists:
        patches.module(parent, attr, nn.ModuleList([container[i] for i in kept]))
    for parent, attr, old in dropped:
        parent.register_module(attr, None)
        patches.call(lambda parent=parent, attr=attr, old=old: parent.register_module(attr, old))
    for module, values in settings:
        for attr, value in values.items():
            patches.attr(module, attr, value)
