"""A pruned model as a difference from its original: the changed widths are found, and putting the pruned
weights and widths into the original object reproduces the pruned model's outputs and undoes bit for bit."""

from __future__ import annotations

import copy
from dataclasses import asdict

import pytest
import torch
from torch import nn

from effdiff.compress.structure import BlockPlan, apply_block_plan, changed_widths, put_structure
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


def stages() -> nn.Module:
    """A root with a list of stages, each with a list of layers, and an optional middle layer."""
    torch.manual_seed(0)
    root = nn.Module()
    root.stages = nn.ModuleList([nn.Module() for _ in range(3)])
    for stage in root.stages:
        stage.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
    root.middle = nn.Linear(4, 4)
    root.depth = 3
    return root


def test_a_block_plan_renames_what_follows_a_removed_child():
    plan = BlockPlan(kept={"stages": [1, 2], "stages.2.layers": [0, 2]})
    assert plan.renamed("stages.2.layers.2") == "stages.1.layers.1"
    assert plan.renamed("stages.1.layers.0") == "stages.0.layers.0"
    assert plan.renamed("middle") == "middle"
    assert BlockPlan.of(None) == BlockPlan() and BlockPlan.of(asdict(plan)) == plan


def test_a_block_plan_shrinks_nested_lists_by_original_names_and_undoes_exactly():
    root = stages()
    keep_layer = root.stages[2].layers[2]
    plan = BlockPlan(kept={"stages": [1, 2], "stages.2.layers": [0, 2]}, dropped=["middle"],
                     settings={"": {"depth": 2}})
    log = PatchLog()
    apply_block_plan(log, root, plan)
    assert len(root.stages) == 2 and len(root.stages[1].layers) == 2 and root.middle is None and root.depth == 2
    assert root.get_submodule(plan.renamed("stages.2.layers.2")) is keep_layer
    assert "stages.1.layers.1.weight" in dict(root.named_parameters())
    log.restore()
    fresh = stages()
    assert len(root.stages) == 3 and root.depth == 3 and isinstance(root.middle, nn.Linear)
    assert all(torch.equal(a, b) for a, b in zip(root.state_dict().values(), fresh.state_dict().values(), strict=True))


def test_a_block_plan_for_another_structure_is_refused():
    with pytest.raises(ValueError, match="names a module this model does not have"):
        apply_block_plan(PatchLog(), stages(), BlockPlan(dropped=["nowhere"]))
    with pytest.raises(ValueError, match=r"keeps \[0, 5\] of 'stages', which has no such children"):
        apply_block_plan(PatchLog(), stages(), BlockPlan(kept={"stages": [0, 5]}))
