"""A pruned model as a difference from its original: the changed widths are found, and putting the pruned
weights and widths into the original object reproduces the pruned model's outputs and undoes bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from effdiff.compress.structure import changed_widths, put_structure
from effdiff.patches import PatchLog


def two_layers() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.GroupNorm(4, 8), nn.Linear(8, 3))


def narrowed(model: nn.Sequential, keep: int = 4) -> nn.Sequential:
    """``model`` with its hidden width cut to ``keep`` by hand (what torch-pruning does, without it)."""
    small = copy.deepcopy(model)
    first, norm, last = small
    with torch.no_grad():
        first.weight = nn.Parameter(first.weight[:keep].clone())
        first.bias = nn.Parameter(first.bias[:keep].clone())
        norm.weight, norm.bias = nn.Parameter(norm.weight[:keep].clone()), nn.Parameter(norm.bias[:keep].clone())
        last.weight = nn.Parameter(last.weight[:, :keep].clone())
    first.out_features, norm.num_channels, norm.num_groups, last.in_features = keep, keep, 2, keep
    return small


def test_the_widths_that_changed_are_found_and_nothing_else():
    original = two_layers()
    widths = changed_widths(original, narrowed(original))
    assert widths == {"0": {"out_features": 4}, "1": {"num_groups": 2, "num_channels": 4}, "2": {"in_features": 4}}


def test_putting_the_structure_in_place_gives_the_pruned_outputs_and_undoes_exactly():
    original, x = two_layers(), torch.randn(5, 6)
    pruned = narrowed(original)
    before = original(x)
    tensors = dict(original.named_parameters())
    log = PatchLog()
    put_structure(log, original, dict(pruned.state_dict()), changed_widths(original, pruned))
    assert torch.equal(original(x), pruned(x)) and original[1].num_groups == 2
    log.restore()
    assert torch.equal(original(x), before) and original[1].num_groups == 4
    assert all(p is tensors[n] for n, p in original.named_parameters())


def test_weights_of_another_architecture_are_refused_by_name():
    with pytest.raises(ValueError, match=r"3 tensors this model does not have \(first: 'extra.bias'\)"):
        put_structure(PatchLog(), two_layers(), {"extra.weight": torch.ones(1), "extra.bias": torch.ones(1),
                                                 "more.weight": torch.ones(1)}, {})
