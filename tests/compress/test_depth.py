"""TinyFusion's learned depth mask: N:M patterns are parsed and refused clearly, every sampled mask keeps exactly N
blocks per group, the choice is the most likely pattern per group, and learning is deterministic for a seed."""

from __future__ import annotations

import pytest
import torch
from _teacher import tiny_teacher

from effdiff.compress.depth import GroupMasks, learn_kept_blocks, parse_pattern, random_kept
from effdiff.distill.trainer import denoiser_call


def test_patterns_are_parsed_and_impossible_ones_refused():
    assert parse_pattern("1:2", 8) == (1, 2) and parse_pattern("2:4", 8) == (2, 4)
    for bad, blocks in (("2:2", 8), ("1:3", 8), ("half", 8), ("0:2", 8)):
        with pytest.raises(ValueError, match="pattern"):
            parse_pattern(bad, blocks)


def test_every_sampled_mask_keeps_n_blocks_per_group_and_the_choice_is_the_likeliest_pattern():
    masks = GroupMasks(8, 2, 4)
    sample = masks.sample(5, tau=1.0, generator=torch.Generator().manual_seed(0))
    assert sample.shape == (5, 8) and torch.allclose(sample, sample.round())
    assert torch.allclose(sample.view(5, 2, 4).sum(-1), torch.tensor(2.0))
    sample.sum().backward()
    assert masks.logits.grad is not None and masks.logits.grad.abs().sum() > 0
    with torch.no_grad():
        masks.logits[0, 5] = 1.0  # combinations(4, 2)[5] == (2, 3)
        masks.logits[1, 0] = 1.0  # (0, 1)
    assert masks.kept() == [2, 3, 4, 5]


def test_random_choices_are_seeded_and_keep_n_per_group():
    kept = random_kept(8, 1, 2, seed=3)
    assert kept == random_kept(8, 1, 2, seed=3) and len(kept) == 4
    assert [i // 2 for i in kept] == [0, 1, 2, 3]


def test_mask_learning_is_deterministic_for_a_seed_and_leaves_the_model_alone():
    pipe = tiny_teacher("dit")
    model = pipe.denoiser
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def loss_of(masked, generator):
        x = torch.randn(2, 1, 32, 32, generator=generator)
        text = torch.randn(2, 4, 384, generator=generator)
        t = torch.randint(0, 1000, (2,), generator=generator)
        return denoiser_call(masked, True)(x, t, text).pow(2).mean()

    runs = []
    for _ in range(2):
        generator = torch.Generator().manual_seed(0)
        runs.append(learn_kept_blocks(model, "transformer_blocks", "1:2", lambda m, g=generator: loss_of(m, g),
                                      iterations=3, batch=2, generator=generator))
    assert runs[0] == runs[1] and len(runs[0][0]) == 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert "forward" not in vars(model.transformer_blocks[0])
