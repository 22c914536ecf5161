"""Digit scenes: deterministic rendering, captions that describe their layouts, the split, the bundle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from effdiff.zoo.data import DIGIT_WORDS, load_digits
from effdiff.zoo.scene_data import _glyphs, caption_pool, scene_bundle
from effdiff.zoo.scenes import (
    CATEGORIES,
    COLOURS,
    COUNT_WORDS,
    EVAL_PER_CATEGORY,
    Obj,
    Prompt,
    eval_prompts,
    num_templates,
    relation_cells,
    render_layouts,
    sample_layout,
    sample_prompt,
    satisfies,
)


@pytest.fixture(scope="module")
def heldout():
    split = load_digits()
    return _glyphs(split.heldout_images), split.heldout_labels


def _random_prompts(n: int, seed: int = 0) -> list[Prompt]:
    rng = np.random.default_rng(seed)
    return [sample_prompt(CATEGORIES[i % len(CATEGORIES)], rng) for i in range(n)]


def _layouts(prompts: list[Prompt], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pairs = [sample_layout(p, rng) for p in prompts]
    return np.stack([d for d, _ in pairs]), np.stack([c for _, c in pairs])


def test_rendering_is_deterministic_for_a_seed(heldout):
    prompts = eval_prompts()[::12]
    digits, colours = _layouts(prompts)
    again_digits, again_colours = _layouts(prompts)
    assert np.array_equal(digits, again_digits) and np.array_equal(colours, again_colours)
    first = render_layouts(digits, colours, *heldout, seed=3)
    assert first.shape == (len(prompts), 3, 64, 64) and first.min() >= -1 and first.max() <= 1
    assert torch.equal(first, render_layouts(digits, colours, *heldout, seed=3))
    assert not torch.equal(first, render_layouts(digits, colours, *heldout, seed=4))  # other glyphs / jitter


def test_empty_cells_stay_black_and_objects_have_their_colour(heldout):
    digits = np.array([[3, -1, -1, 7]])
    colours = np.array([[COLOURS.index("red"), 0, 0, COLOURS.index("blue")]])
    image = render_layouts(digits, colours, *heldout, seed=0)[0]
    cells = {0: image[:, :32, :32], 1: image[:, :32, 32:], 2: image[:, 32:, :32], 3: image[:, 32:, 32:]}
    assert (cells[1] == -1).all() and (cells[2] == -1).all()
    red, blue = (cells[0] + 1) / 2, (cells[3] + 1) / 2
    assert red[0].sum() > 4 * red[2].sum()  # red dominates the top-left digit
    assert blue[2].sum() > 2 * blue[0].sum()


@pytest.mark.parametrize("category", CATEGORIES)
def test_sampled_layouts_show_exactly_their_caption(category):
    rng = np.random.default_rng(1)
    for _ in range(200):
        prompt = sample_prompt(category, rng)
        digits, colours = sample_layout(prompt, rng)
        assert satisfies(prompt, digits, colours), prompt.text
        assert (digits >= 0).sum() == len(prompt.objects)  # the caption names every object
        text = prompt.text
        for obj in prompt.objects:
            assert DIGIT_WORDS[obj.digit] in text or str(obj.digit) in text, text
            if obj.colour:
                assert obj.colour in text, text
        if category == "counting":
            assert COUNT_WORDS[len(prompt.objects)] in text
        if prompt.relation is not None:
            first, second = (int(np.flatnonzero(digits == o.digit)[0]) for o in prompt.objects)
            assert (first, second) in {relation_cells(prompt.relation, i) for i in range(2)}
        # removing any object breaks the prompt
        for cell in np.flatnonzero(digits >= 0):
            fewer = digits.copy()
            fewer[cell] = -1
            assert not satisfies(prompt, fewer, colours), text


def test_relations_and_colours_are_checked():
    left = Prompt("position", (Obj(3, "red"), Obj(7, "blue")), "left of", template=1)
    red, blue = COLOURS.index("red"), COLOURS.index("blue")
    assert satisfies(left, np.array([-1, -1, 3, 7]), np.array([0, 0, red, blue]))
    assert not satisfies(left, np.array([7, 3, -1, -1]), np.array([blue, red, 0, 0]))  # swapped
    assert not satisfies(left, np.array([3, -1, -1, 7]), np.array([red, 0, 0, blue]))  # diagonal
    assert not satisfies(left, np.array([3, 7, -1, -1]), np.array([blue, red, 0, 0]))  # colours swapped
    count = Prompt("counting", (Obj(5),) * 3)
    assert satisfies(count, np.array([5, 5, -1, 5]), np.zeros(4, dtype=int))
    assert not satisfies(count, np.array([5, 5, 5, 5]), np.zeros(4, dtype=int))  # counting is exact


def test_caption_templates_and_paraphrases():
    red3, blue7 = Obj(3, "red"), Obj(7, "blue")
    assert Prompt("position", (red3, blue7), "left of", template=1).text == "a red 3 left of a blue 7"
    assert Prompt("position", (red3, blue7), "left of", template=5).text == "a blue 7 right of a red 3"
    assert Prompt("position", (Obj(7), Obj(1, "yellow")), "above").text == "a seven above a yellow one"
    assert Prompt("position", (Obj(7), Obj(1, "yellow")), "above", template=2).text == "a seven on top of a yellow one"
    assert Prompt("counting", (Obj(5, "green"),) * 2).text == "two green fives"
    assert Prompt("single", (Obj(8),), template=1).text == "an 8"
    for category in CATEGORIES:
        prompt = sample_prompt(category, np.random.default_rng(0))
        texts = {Prompt(category, prompt.objects, prompt.relation, t).text for t in range(num_templates(category))}
        assert len(texts) == num_templates(category), texts  # every paraphrase differs


def test_eval_prompts_are_fixed_and_distinct():
    prompts = eval_prompts()
    assert prompts == eval_prompts()
    assert len(prompts) == EVAL_PER_CATEGORY * len(CATEGORIES)
    assert len({p.text for p in prompts}) == len(prompts)
    for category in CATEGORIES:
        assert sum(p.category == category for p in prompts) == EVAL_PER_CATEGORY


def test_caption_pool_contains_the_eval_prompts():
    pool = {p.text for p in caption_pool()}
    assert {p.text for p in eval_prompts()} <= pool


@pytest.fixture(scope="module")
def bundle():
    return scene_bundle()  # built once (≈ 30 s: MiniLM encodes ≈ 2,300 captions), then cached


def test_held_out_digits_never_reach_training_scenes(bundle):
    from effdiff.zoo.scene_data import SceneSampler

    split = load_digits()
    assert torch.equal(bundle["train_glyphs"], _glyphs(split.train_images))
    assert torch.equal(bundle["heldout_glyphs"], _glyphs(split.heldout_images))
    train = {g.numpy().tobytes() for g in bundle["train_glyphs"]}
    assert not any(g.numpy().tobytes() in train for g in bundle["heldout_glyphs"])
    sampler = SceneSampler(bundle, split="train")
    assert torch.equal(sampler.glyphs, bundle["train_glyphs"])
    assert int(sampler.by_class.max()) < len(bundle["train_glyphs"])
    # every glyph a training batch picks has the digit its layout asks for
    labels = bundle["train_labels"][sampler.by_class]
    assert (labels == torch.arange(10)[:, None]).all()


def test_bundle_fits_and_caption_batches_are_consistent(bundle, tmp_path):
    from effdiff.zoo.scene_data import SceneSampler
    from effdiff.zoo.text import MAX_TOKENS, TEXT_DIM

    path = tmp_path / "b.pt"
    torch.save(bundle, path)
    assert path.stat().st_size <= 40 * 2**20
    assert bundle["captions"][0] == "" and bundle["states"].dtype == torch.float16
    assert bundle["states"].shape == (len(bundle["captions"]), MAX_TOKENS, TEXT_DIM)
    prompts = caption_pool()
    assert bundle["captions"][1:] == [p.text for p in prompts]
    for i in range(0, len(prompts), 97):  # stored layouts show their captions
        for j in range(bundle["layout_digits"].shape[1]):
            assert satisfies(prompts[i], bundle["layout_digits"][i, j].numpy(), bundle["layout_colours"][i, j].numpy())
    sampler = SceneSampler(bundle)
    images, text = sampler.caption_batch(6, torch.Generator().manual_seed(0), dropout=0.0)
    assert images.shape == (6, 3, 64, 64) and text.shape == (6, MAX_TOKENS, TEXT_DIM)
    images, digits, colours = sampler.labelled_batch(5, torch.Generator().manual_seed(0))
    assert images.shape == (5, 3, 64, 64) and digits.shape == colours.shape == (5, 4)
