"""Depth pruning: a layer that does not change the output scores zero and goes first, the random order is seeded,
the budget takes the shortest prefix that meets it, removed layers keep the model running at the same shape, and
a budget that removing everything cannot meet is refused."""

from __future__ import annotations

import copy

import pytest
import torch
from _teacher import tiny_teacher

from effdiff.adapters import adapter_for
from effdiff.compress.layers import layers_for_budget, output_loss_scores, removal_order
from effdiff.compress.structure import remove_layers
from effdiff.distill.trainer import denoiser_call
from effdiff.patches import PatchLog


@pytest.mark.parametrize("kind", ["sd", "dit"])
def test_the_output_loss_ranks_a_neutralised_layer_first_and_removal_keeps_the_shape(kind):
    pipe = tiny_teacher(kind)
    model = copy.deepcopy(pipe.denoiser)
    candidates = [name for name, _ in adapter_for(model).removable_layers()]
    assert len(candidates) >= 2
    neutral = candidates[-1]
    remove_layers(PatchLog(), model, [neutral])  # already skipped: removing it again changes nothing
    gen = torch.Generator().manual_seed(0)
    images, text = torch.randn(2, 1, 32, 32, generator=gen), torch.randn(2, 8, 384, generator=gen)
    scores = output_loss_scores(model, denoiser_call(model, kind == "dit"), candidates, images, text,
                                pipe.scheduler.alphas_cumprod.float(), timesteps=3, generator=gen)
    assert scores[neutral] == 0.0 and all(scores[n] > 0 for n in candidates if n != neutral)
    assert removal_order(scores, "output")[0] == neutral
    call = adapter_for(pipe.denoiser).example_call(2)
    removed = copy.deepcopy(pipe.denoiser)
    remove_layers(PatchLog(), removed, candidates[:2])
    assert removed(**call)[0].shape == pipe.denoiser(**call)[0].shape


def test_the_random_order_is_seeded_and_unknown_orders_are_refused():
    scores = {f"layer{i}": float(i) for i in range(8)}
    assert removal_order(scores, "random", 3) == removal_order(scores, "random", 3)
    assert removal_order(scores, "random", 3) != removal_order(scores, "random", 4)
    with pytest.raises(ValueError, match="importance must be one of output, random"):
        removal_order(scores, "taylor")


def test_the_budget_takes_the_shortest_prefix_and_refuses_what_cannot_be_met():
    model = tiny_teacher("dit").denoiser
    order = [name for name, _ in adapter_for(model).removable_layers()]
    removed, facts = layers_for_budget(model, order, 0.6)
    assert removed == order[:facts["layers_removed"]] and facts["macs_fraction"] <= 0.6
    longer, _ = layers_for_budget(model, order, 0.3)
    assert len(longer) > len(removed)
    with pytest.raises(ValueError, match="removing all 1 removable layers"):
        layers_for_budget(model, order[:1], 0.1)
