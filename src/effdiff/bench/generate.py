"""Image grids: ``generate`` for the CLI's ``effdiff generate``, ``save_grid`` for the report."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def grid_image(images01: torch.Tensor, columns: int = 8, pad: int = 2, scale: int = 1) -> Image.Image:
    """Tile (N, C, H, W) images in [0, 1] into one PIL image (grey for C=1, RGB for C=3)."""
    if images01.ndim != 4 or len(images01) == 0:
        raise ValueError(f"expected a non-empty (N, C, H, W) tensor, got shape {tuple(images01.shape)}")
    n, c, h, w = images01.shape
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    canvas = torch.ones(c, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i, image in enumerate(images01.float().clamp(0, 1)):
        r, col = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[:, y : y + h, x : x + w] = image
    array = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(array[..., 0], mode="L") if c == 1 else Image.fromarray(array[..., :3], mode="RGB")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def save_grid(images01: torch.Tensor, path: str | Path, columns: int = 8, scale: int = 2) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(images01, columns=columns, scale=scale).save(path)
    return path


def generate(model: str, recipe: str, prompt: str, n: int, out_png: str | Path | None, seed: int = 0,
             steps: int | None = None, guidance: float = 4.0, *, loader=None, accelerate_fn=None) -> Path | None:
    """Generate ``n`` images of ``prompt`` (seeds seed, seed+1, ...) with ``recipe`` and save a grid PNG.

    ``steps=None`` leaves the step count to the recipe's solver (or the pipeline's default): an explicit
    ``num_inference_steps`` would override ``dpmpp2m:steps=20``. Arguments and the output path are
    checked before the model loads. For a class-conditional pipeline (DiT) the prompt must be an
    integer class label.
    """
    from effdiff.bench import validate
    from effdiff.calling import call_parameters, to_images

    validate.at_least(n, 1, "n", "images to generate")
    if steps is not None:
        validate.steps(steps, "steps")
    validate.guidance(guidance, "guidance")
    validate.seed(seed, "seed")
    out_png = validate.output_file(out_png) if out_png is not None else None  # None: a rank that writes nothing
    if loader is None:
        from effdiff.zoo import load as loader
    pipe = loader(model)
    if recipe:
        if accelerate_fn is None:
            from effdiff.api import accelerate as accelerate_fn
        accelerate_fn(pipe, recipe)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    kwargs: dict = {"guidance_scale": guidance, "generator": gens}
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    if "class_labels" in call_parameters(pipe):
        try:
            label = int(prompt)
        except ValueError as exc:
            msg = f"{model} is class-conditional: give an integer class label, not {prompt!r}"
            raise ValueError(msg) from exc
        out = pipe(class_labels=[label] * n, output_type="np", **kwargs)
    else:
        out = pipe([prompt] * n, output_type="pt", **kwargs)
    return save_grid(to_images(out), out_png, columns=min(8, n)) if out_png is not None else None
