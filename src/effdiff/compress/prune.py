"""Structural pruning of a denoiser to a MAC budget, through torch-pruning's dependency graph.

torch-pruning (Fang et al., DepGraph, arXiv 2301.12900; the library Diff-Pruning's authors use) finds every layer
coupled to a channel (a convolution's output, the GroupNorm, the next convolution's input, the skip that adds to
it) and removes them together, so the pruned model is a smaller dense model that is faster on every device.
Attention is pruned by whole heads (a head's query/key/value rows and the output projection's columns) so the
softmax temperature, 1/√(head width), does not change. The adapter says which layers must keep their width and
fixes the attributes diffusers' forwards read (``Adapter.fix_pruned_widths``).

The MAC budget is met by bisection on the channel ratio: each trial prunes a copy and counts one call's MACs,
attention's matmuls included (``effdiff.eval.cost.count_flops``).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

IMPORTANCES = ("taylor", "magnitude")
ALLOCATIONS = ("uniform", "global")
MAX_GLOBAL_RATIO = 0.75  # global allocation: no layer group loses more than this share of its channels


def _importance(name: str) -> Any:
    import torch_pruning as tp

    if name == "taylor":
        return tp.importance.TaylorImportance(multivariable=False)  # Diff-Pruning's choice
    if name == "magnitude":
        return tp.importance.MagnitudeImportance(p=2)
    raise ValueError(f"importance must be one of {', '.join(IMPORTANCES)}, got {name!r}")


def _largest_grouping(channels: int, per_group: int) -> int:
    """The most groups ``channels`` divide into with at least ``per_group`` channels each."""
    return max(g for g in range(1, max(1, channels // per_group) + 1) if channels % g == 0)


def _regrouping_norm_pruner() -> Any:
    """A GroupNorm pruner that removes any channels and then regroups, instead of torch-pruning's, which removes
    the same count from every group: with one or two channels per group (the bundled U-Net: 32 groups of 32 and
    64 channels) that can only keep a layer whole or halve it, so a MAC budget could not be met smoothly. The
    groups after pruning are the most that keep the original channels per group (``_largest_grouping``)."""
    import torch_pruning as tp

    class RegroupingGroupNormPruner(tp.pruner.function.GroupNormPruner):
        def prune_out_channels(self, layer: nn.GroupNorm, idxs: list) -> nn.Module:
            per_group = layer.num_channels // layer.num_groups
            super().prune_out_channels(layer, idxs)
            layer.num_groups = _largest_grouping(layer.num_channels, per_group)
            return layer

        prune_in_channels = prune_out_channels

        def get_in_channel_groups(self, layer: nn.GroupNorm) -> int:
            return 1

        get_out_channel_groups = get_in_channel_groups

    return RegroupingGroupNormPruner()


def _adapter(model: nn.Module) -> Any:
    from effdiff.adapters import adapter_for

    adapter = adapter_for(model)
    if adapter.pruning_kept() is None:
        raise ValueError(f"no pruning plan for {type(model).__name__} yet (U-Nets and PixArt-style DiTs)")
    return adapter


def prune_in_place(model: nn.Module, ratio: float, importance: str,
                   allocation: str = "uniform") -> dict[str, list[int]]:
    """Remove ``ratio`` of the channels of every prunable layer group (and of each attention's heads) from
    ``model`` ("uniform", the authors' setting), or ``ratio`` of all channels wherever the importance is lowest
    ("global": torch-pruning ranks every group's channels together, each group keeping at least
    ``1 - MAX_GLOBAL_RATIO``; attention keeps its heads, since a global head ranking could empty a layer of its
    one or two); Taylor importance reads the gradients already in ``.grad``. Returns, for every layer that lost
    output channels in one group, the original indices of those it kept (in order): a pruned layer's channel ``j``
    is the original's ``kept[j]``, which is what lets a finetune match the pruned model's features to the
    teacher's."""
    import torch_pruning as tp

    if not 0.0 < ratio < 1.0:
        raise ValueError(f"the pruning ratio must be in (0, 1), got {ratio}")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    adapter = _adapter(model)
    model.requires_grad_(True)  # torch-pruning leaves frozen layers whole
    attention = [attn for _, attn in adapter.attention()]
    heads = {proj: attn.heads for attn in attention for proj in (attn.to_q, attn.to_k, attn.to_v)}
    # torch-pruning removes ceil(ratio × heads) heads; every attention keeps at least one
    head_ratios = {attn: min(ratio, (attn.heads - 1) / attn.heads) for attn in attention}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Unwrapped parameters.*")
        warnings.filterwarnings("ignore", message=".*prune the last non-singleton dimension.*")
        pruner = tp.pruner.BasePruner(
            model, adapter.example_call(1), importance=_importance(importance), pruning_ratio=ratio,
            global_pruning=allocation == "global", max_pruning_ratio=MAX_GLOBAL_RATIO,
            ignored_layers=adapter.pruning_kept(), num_heads=heads, prune_num_heads=allocation == "uniform",
            prune_head_dims=False,
            head_pruning_ratio_dict=head_ratios, in_channel_groups={}, out_channel_groups={},
            customized_pruners={nn.GroupNorm: _regrouping_norm_pruner()})
        names = {module: name for name, module in model.named_modules()}
        widths: dict[str, int | None] = {}  # each layer's output width before its group pruned it
        removed: dict[str, set[int]] = {}
        twice: set[str] = set()  # pruned by two groups: the second group's indices count the first's survivors
        for group in pruner.step(interactive=True):
            this_group: dict[str, set[int]] = {}
            for dep, idxs in group:
                module = dep.target.module
                if pruner.DG.is_out_channel_pruning_fn(dep.handler) and module in names:
                    this_group.setdefault(names[module], set()).update(int(i) for i in idxs)
                    widths.setdefault(names[module], _out_width(module))
            twice |= this_group.keys() & removed.keys()
            removed.update(this_group)
            group.prune()
    adapter.fix_pruned_widths({attn.to_q: pruner.num_heads[attn.to_q] for attn in attention})
    model.zero_grad(set_to_none=True)
    return {name: [i for i in range(widths[name]) if i not in gone] for name, gone in removed.items()
            if widths[name] is not None and name not in twice}


def _out_width(module: nn.Module) -> int | None:
    """How many output channels a layer torch-pruning prunes has (None for the rest)."""
    for attribute in ("out_channels", "out_features", "num_channels", "normalized_shape"):
        value = getattr(module, attribute, None)
        if value is not None:
            return value if isinstance(value, int) else value[0]
    return None


def call_macs(model: nn.Module) -> int:
    """MACs of one denoiser call on one sample at the model's native size."""
    from effdiff.eval.cost import count_flops

    call = _adapter(model).example_call(1)
    with torch.no_grad(), count_flops() as counted:
        model(**call)
    return counted.macs


def copy_with_gradients(model: nn.Module) -> nn.Module:
    """A deep copy that keeps each parameter's ``.grad`` (``copy.deepcopy`` drops them; Taylor importance reads
    them)."""
    clone = copy.deepcopy(model)
    for mine, theirs in zip(clone.parameters(), model.parameters(), strict=True):
        if theirs.grad is not None:
            mine.grad = theirs.grad.clone()
    return clone


def prune_to_macs(model: nn.Module, target: float, importance: str, trials: int = 10,
                  allocation: str = "uniform") -> tuple[nn.Module, dict[str, Any]]:
    """A pruned copy of ``model`` with at most ``target`` × its MACs (the largest ratio-bisection trial under
    it), and {ratio, macs_fraction, params_fraction, kept_channels (``prune_in_place``'s)}. ``model`` keeps its
    weights (and gradients)."""
    if not 0.0 < target < 1.0:
        raise ValueError(f"the MAC target is a fraction of the original's MACs in (0, 1), got {target}")
    full_macs, full_params = call_macs(model), sum(p.numel() for p in model.parameters())
    low, high, best = 0.0, 0.95, None
    for _ in range(trials):
        ratio = (low + high) / 2
        trial = copy_with_gradients(model)
        kept = prune_in_place(trial, ratio, importance, allocation)
        fraction = call_macs(trial) / full_macs
        if fraction <= target:
            high = ratio
            if best is None or fraction > best[1]["macs_fraction"]:
                best = (trial, {"ratio": ratio, "macs_fraction": fraction, "kept_channels": kept})
        else:
            low = ratio
    if best is None:
        raise ValueError(f"pruning cannot bring {type(model).__name__} under {target:.0%} of its MACs")
    pruned, facts = best
    facts["params_fraction"] = sum(p.numel() for p in pruned.parameters()) / full_params
    return pruned, facts
