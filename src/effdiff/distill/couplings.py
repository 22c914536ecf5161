"""The teacher's own noise → image pairs, drawn once per run and kept in the run folder.

Two objectives learn from where a deterministic sampler carries a given noise: rectified flow's reflow (Liu et
al., arXiv 2209.03003) and its one-step phase, and distribution matching distillation's regression loss (Yin et
al., arXiv 2311.18828, which pairs its distribution loss with an L2/LPIPS regression onto such pairs so the
one-step generator keeps the teacher's noise → image mapping and does not collapse onto a few modes).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch

from effdiff.distill.teacher import ddim_sample


class Couplings(NamedTuple):
    """Noise → image pairs and the caption states they were made under (row i of each belongs together)."""

    noise: torch.Tensor
    images: torch.Tensor
    text: torch.Tensor


class TeacherCouplings:
    """Mixin of a ``DistillTrainer``: ``couplings_from`` samples ``config.couplings`` pairs with
    ``config.coupling_steps`` DDIM steps, or reads back the ones an earlier run with the same settings wrote."""

    def couplings_from(self, model: torch.nn.Module, guidance: float | None, path: Path) -> Couplings:
        """Pairs sampled by ``model`` (guided when ``guidance`` is set), read back from ``path`` when an earlier
        run with the same settings wrote them. Noise and captions come from a generator of their own, so every
        call pairs the same noises with the same captions."""
        from effdiff.distill.trainer import denoiser_call
        from effdiff.zoo.train import caption_of

        made_with = {k: v for k, v in asdict(self.config).items() if k not in self.resumable_changes}
        if path.is_file():
            saved = torch.load(path, map_location=self.device)
            if saved["made_with"] == made_with:
                return Couplings(saved["noise"], saved["images"], saved["text"])
        c = self.config
        gen = torch.Generator().manual_seed(c.seed + 1)
        shape = (c.couplings, *self.images.shape[1:])
        noise = torch.randn(shape, generator=gen).to(self.device)
        labels = torch.randint(0, len(self.per_digit), (c.couplings,), generator=gen).to(self.device)
        text = caption_of(labels, self.per_digit, gen)
        call = denoiser_call(model, self.is_dit)
        uncond = self.uncond if guidance is not None else None
        final_alpha = float(self.pipe.scheduler.final_alpha_cumprod)
        chunk = c.batch_size * 4
        images = torch.cat([
            ddim_sample(call, noise[i:i + chunk], text[i:i + chunk], c.coupling_steps, self.alphas_cumprod,
                        final_alpha, self.prediction_type, uncond, guidance or 1.0)
            for i in range(0, c.couplings, chunk)])
        torch.save({"noise": noise, "images": images, "text": text, "made_with": made_with}, path)
        return Couplings(noise, images, text)
