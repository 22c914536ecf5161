"""The zoo's quality bar: 1,000 samples (100 per digit), 50 DDIM steps, guidance 4, fixed seeds,
scored against the 1,000 held-out digits with the bundled ``mnist-features`` classifier.
"""

from __future__ import annotations

import torch

from effdiff.zoo.data import NUM_CLASSES, eval_prompt


@torch.no_grad()
def generate_eval_samples(
    pipe, per_digit: int = 100, steps: int = 50, guidance: float = 4.0, seed: int = 0, batch: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images in [-1, 1] of shape (N, 1, 32, 32), the digit each was asked for); seed i+seed per image."""
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_digit)
    images = []
    for start in range(0, len(labels), batch):
        chunk = labels[start : start + batch]
        generators = [torch.Generator(pipe.device).manual_seed(seed + start + i) for i in range(len(chunk))]
        out = pipe([eval_prompt(int(d)) for d in chunk], num_inference_steps=steps, guidance_scale=guidance,
                   generator=generators, output_type="pt").images
        images.append(out.cpu() * 2 - 1)
    return torch.cat(images), labels
