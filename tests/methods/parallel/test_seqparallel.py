"""``seqparallel`` on gloo ranks started here, each holding its share of the tiny DiT's tokens through every block.
Ulysses (heads exchanged all-to-all, also with a head count the ranks do not divide), ring (keys and values passed
round) and their hybrid on four ranks all give the single-process image up to float rounding — far closer than the
patch split without any exchange; a fixed-schedule cache stacks; ``remove()`` restores the single-process image.
MMDiTs (stock FLUX and SD3 pipelines): text and image tokens both split — FLUX's 7 text tokens unevenly, its
rotary rows with them — and joint attention made whole, on two ranks and in the four-rank hybrid; FLUX also on
diffusers' own engine, set up on the CPU ranks, and with the transformer compiled first.
Refusals: no process group, feature-driven caches, a ring that does not divide the world, more Ulysses ranks than
heads, diffusers' engine where it cannot run."""

from __future__ import annotations

import pytest
import torch
from _ranks import on_ranks
from _stock import build
from conftest import make_tiny_dit, make_tiny_sd, sample

import effdiff
from effdiff import RecipeError

STEPS = 6


def _tokens_seen(pipe) -> list[int]:
    seen: list[int] = []
    pipe.transformer.transformer_blocks[0].register_forward_hook(lambda m, a, out: seen.append(out.shape[1]))
    return seen


def _image(pipe, recipe: str) -> torch.Tensor:
    effdiff.accelerate(pipe, recipe)
    try:
        return sample(pipe, steps=STEPS)
    finally:
        pipe.effdiff.remove()


def _refusal(make, recipe: str) -> str:
    try:
        pipe = make()
        effdiff.accelerate(pipe, recipe)
        sample(pipe, steps=1)
    except RecipeError as exc:
        return str(exc)
    return ""


def _stock_image(pipe, text: int = 7) -> torch.Tensor:
    """Three steps at 48 × 32 px (96 image tokens); FLUX with ``text`` text tokens (7: two or four ranks share them
    unevenly; diffusers' engine needs them to divide)."""
    extra = {"max_sequence_length": text} if type(pipe).__name__ == "FluxPipeline" else {}
    return pipe("a red apple", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt",
                height=48, width=32, **extra).images


def _mmdits(recipes: dict[str, tuple[str, ...]]) -> dict:
    """Each stock MMDiT's images under its ``recipes`` and the single-process image for each (keyed by recipe), and
    whether ``remove()`` restores the single-process image."""
    results: dict = {}
    for name in recipes:
        pipe = build(name)
        single = {text: _stock_image(pipe, text) for text in (7, 8)}
        images = {}
        for recipe in recipes[name]:
            text = 8 if "engine=diffusers" in recipe else 7
            effdiff.accelerate(pipe, recipe)
            images[recipe] = (_stock_image(pipe, text), single[text])
            pipe.effdiff.remove()
        results[name] = {**images, "restored": bool(torch.equal(_stock_image(pipe), single[7]))}
    return results


def _compiled_flux() -> dict:
    """The common idiom — the transformer compiled in place first (AOT-traced, no code generated: the capture is
    what could break), then ``seqparallel``: the core recompiles beneath its patches, dynamo traces the attention
    with the interception active and the all-to-alls inside."""
    from torch._dynamo.utils import counters

    from effdiff.adapters.compiled import how_compiled

    pipe = build("flux")
    single = _stock_image(pipe)
    pipe.transformer.compile(backend="aot_eager")
    counters.clear()
    effdiff.accelerate(pipe, "seqparallel")
    split = _stock_image(pipe)
    graphs = counters["stats"]["unique_graphs"]
    pipe.effdiff.remove()
    return {"images": (split, single), "graphs": graphs, "compiled after remove": how_compiled(pipe.transformer)}


def _two_ranks() -> dict:
    pipe = make_tiny_dit()
    seen = _tokens_seen(pipe)
    single = sample(pipe, steps=STEPS)
    results: dict = {"single": single}
    for recipe in ("seqparallel", "seqparallel:ring=2", "distrifusion:exchange=none"):
        results[recipe] = _image(pipe, recipe)
    results["tokens"] = sorted(set(seen))
    results["restored"] = bool(torch.equal(sample(pipe, steps=STEPS), single))
    results["fora"] = (_image(pipe, "fora:interval=2"), _image(pipe, "seqparallel+fora:interval=2"))
    both = ("seqparallel", "seqparallel:ring=2")
    results["mmdit"] = _mmdits({"flux": (*both, "seqparallel:engine=diffusers"), "sd3": both})
    results["compiled"] = _compiled_flux()
    three = make_tiny_dit(heads=3)
    results["three heads"] = (sample(three, steps=STEPS), _image(three, "seqparallel"))
    results["refused"] = {
        "fbcache": _refusal(make_tiny_dit, "seqparallel+fbcache"),
        "tome": _refusal(make_tiny_dit, "seqparallel+tome"),
        "ring": _refusal(make_tiny_dit, "seqparallel:ring=3"),
        "unet": _refusal(make_tiny_sd, "seqparallel"),
        "engine": _refusal(make_tiny_dit, "seqparallel:engine=diffusers"),
        "diffusers ring": _refusal(lambda: build("flux"), "seqparallel:engine=diffusers,ring=2"),
        "branches": _refusal(make_tiny_dit, "cfgparallel+seqparallel"),
    }
    return results


def _four_ranks() -> dict:
    pipe = make_tiny_dit()
    single = sample(pipe, steps=STEPS)
    return {"single": single, "hybrid": _image(pipe, "seqparallel:ring=2"),
            "too many heads": _refusal(make_tiny_dit, "seqparallel"),
            "mmdit": _mmdits({m: ("seqparallel:ring=2",) for m in ("flux", "sd3")})}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return on_ranks(_two_ranks, tmp_path_factory.mktemp("seqparallel"))


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("recipe", ["seqparallel", "seqparallel:ring=2"])
def test_ulysses_and_ring_give_the_single_process_image(ranks, recipe):
    for rank in ranks:
        assert _gap(rank[recipe], rank["single"]) < 1e-4
    naive = _gap(ranks[0]["distrifusion:exchange=none"], ranks[0]["single"])
    assert naive > 100 * _gap(ranks[0][recipe], ranks[0]["single"])  # the exchange is what makes it whole
    assert torch.equal(ranks[0][recipe], ranks[1][recipe])  # every rank ends with the same image


@pytest.mark.parametrize("model", ["flux", "sd3"])
@pytest.mark.parametrize("recipe", ["seqparallel", "seqparallel:ring=2"])
def test_mmdit_joint_attention_is_made_whole(ranks, model, recipe):
    for rank in ranks:
        assert _gap(*rank["mmdit"][model][recipe]) < 1e-4
        assert rank["mmdit"][model]["restored"]
    assert torch.equal(ranks[0]["mmdit"][model][recipe][0], ranks[1]["mmdit"][model][recipe][0])


def test_diffusers_engine_runs_flux_on_cpu_ranks(ranks):
    """diffusers' own context parallelism (its FLUX plan and Ulysses attention), set up on a CPU mesh."""
    for rank in ranks:
        assert _gap(*rank["mmdit"]["flux"]["seqparallel:engine=diffusers"]) < 1e-4


def test_it_composes_with_a_compiled_transformer(ranks):
    for rank in ranks:
        compiled = rank["compiled"]
        assert _gap(*compiled["images"]) < 1e-4
        assert compiled["graphs"] > 0  # dynamo captured graphs beneath the patches
        assert compiled["compiled after remove"] == "in place"  # remove() hands the user's compilation back
    assert torch.equal(ranks[0]["compiled"]["images"][0], ranks[1]["compiled"]["images"][0])


def test_each_rank_holds_half_the_tokens_and_remove_restores(ranks):
    for rank in ranks:
        assert rank["tokens"] == [8, 16]  # 16 single-process, 8 per rank split
        assert rank["restored"]


def test_heads_the_ranks_do_not_divide_split_unevenly(ranks):
    single, split = ranks[0]["three heads"]
    assert _gap(single, split) < 1e-4


def test_a_fixed_schedule_cache_stacks(ranks):
    alone, stacked = ranks[0]["fora"]
    assert _gap(alone, stacked) < 1e-4


def test_refusals_name_the_reason(ranks):
    refused = ranks[0]["refused"]
    assert "fbcache decides from the features" in refused["fbcache"]
    assert "tome decides from the features or changes the tokens" in refused["tome"]
    assert "ring=3 does not divide the world size 2" in refused["ring"]
    assert "seqparallel supports dit backbones" in refused["unet"]
    assert "has no context-parallel plan in diffusers; use engine=effdiff" in refused["engine"]
    assert "diffusers' native attention has no ring" in refused["diffusers ring"]
    assert "the 2 ranks must split into 2 CFG branches of 2 or more" in refused["branches"]


def test_the_usp_hybrid_on_four_ranks(tmp_path):
    ranks = on_ranks(_four_ranks, tmp_path, world=4)
    for rank in ranks:
        assert _gap(rank["hybrid"], rank["single"]) < 1e-4
    assert "Ulysses over 4 ranks needs at least as many heads (2 here); use ring=4" in ranks[0]["too many heads"]
    for rank in ranks:
        for images in rank["mmdit"].values():
            assert _gap(*images["seqparallel:ring=2"]) < 1e-4


def test_without_a_process_group_it_is_refused():
    with pytest.raises(RecipeError, match="no process group with 2 or more ranks"):
        effdiff.accelerate(make_tiny_dit(), "seqparallel")
