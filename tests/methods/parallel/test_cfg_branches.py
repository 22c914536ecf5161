"""``cfgparallel`` beside a method that splits one image, on four gloo ranks started here: ranks 0–1 compute the
unconditional half of every guided step and ranks 2–3 the conditional half (the outer split, as in DistriFusion's
and xDiT's setups), and the other method splits each half's image between its branch's two ranks. Exact
exchanges give the single-process image up to float rounding, in either written order; each method sees its own
group's ranks. An MMDiT (the stock SD3 pipeline) splits its text and image tokens inside each branch."""

from __future__ import annotations

import pytest
from _ranks import on_ranks
from _stock import build
from conftest import make_tiny_dit, make_tiny_sd, sample

import effdiff

STEPS = 4
STACKS = {
    "dit": ("cfgparallel+distrifusion:exchange=sync", "distrifusion:exchange=sync+cfgparallel",
            "cfgparallel+seqparallel", "cfgparallel+seqparallel:ring=2", "cfgparallel+pipefusion:patches=1"),
    "unet": ("cfgparallel+distrifusion:exchange=sync",),
    "sd3": ("cfgparallel+seqparallel",),
}


def _four_ranks() -> dict:
    results: dict = {}
    for kind, make in (("dit", make_tiny_dit), ("unet", make_tiny_sd), ("sd3", lambda: build("sd3"))):
        pipe = make()
        single = sample(pipe, steps=STEPS)
        for recipe in STACKS[kind]:
            effdiff.accelerate(pipe, recipe)
            groups = {m.name: (m.rank, m.world, m.members) for m in pipe.effdiff.methods}
            image = sample(pipe, steps=STEPS)
            pipe.effdiff.remove()
            results[(kind, recipe)] = {"gap": float((image - single).abs().max()), "groups": groups}
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return on_ranks(_four_ranks, tmp_path_factory.mktemp("cfg_branches"), world=4)


@pytest.mark.parametrize("kind, recipe", [(k, r) for k, rows in STACKS.items() for r in rows])
def test_a_cfg_split_outside_an_image_split_gives_the_single_process_image(ranks, kind, recipe):
    for rank in ranks:
        assert rank[(kind, recipe)]["gap"] < 1e-4


def test_each_method_works_in_its_own_group(ranks):
    recipe = "cfgparallel+distrifusion:exchange=sync"
    for global_rank, rank in enumerate(ranks):
        groups = rank[("dit", recipe)]["groups"]
        branch, index = divmod(global_rank, 2)
        assert groups["cfgparallel"] == (branch, 2, [index, index + 2])  # across the branches
        assert groups["distrifusion"] == (index, 2, [2 * branch, 2 * branch + 1])  # inside its branch
