"""The digit-scene judge: a small CNN that reads each 2×2 grid cell, and the GenEval-style scorer.

Per cell it predicts presence, digit and colour; the scorer turns those detections into a layout and
checks it against each prompt's structured spec (``scenes.satisfies``). Any object with a
``detect(images) -> (digits, colours)`` method can score, which is how the tests use an exact
template-matching oracle. The 256-d concatenation of the four cell embeddings is the feature space
for FID/KID on scenes (it sees layout, digits and colours, unlike a single pooled vector).
"""

from __future__ import annotations

import os
from typing import Protocol

import torch

from effdiff.zoo.scenes import COLOURS, NUM_CELLS, Prompt, satisfies, score_by_category

CELL_DIM = 64


class Detector(Protocol):
    def detect(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(digit per cell, -1 where empty; colour index per cell), both (N, 4), for images in [-1, 1]."""


def _block(cin: int, cout: int) -> list[torch.nn.Module]:
    return [torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.GroupNorm(8, cout), torch.nn.SiLU()]


class SceneJudge(torch.nn.Module):
    """64×64 RGB → an 8×8 map, average-pooled onto the 2×2 cells; three heads read each cell."""

    feature_dim = NUM_CELLS * CELL_DIM

    def __init__(self) -> None:
        super().__init__()
        pool = torch.nn.MaxPool2d(2)
        self.body = torch.nn.Sequential(
            *_block(3, 32), *_block(32, 32), pool,
            *_block(32, 64), *_block(64, 64), pool,
            *_block(64, 128), *_block(128, 128), pool,
            *_block(128, 128), torch.nn.AdaptiveAvgPool2d(2),
        )
        self.cell = torch.nn.Sequential(torch.nn.Linear(128, CELL_DIM), torch.nn.SiLU())
        self.presence = torch.nn.Linear(CELL_DIM, 1)
        self.digit = torch.nn.Linear(CELL_DIM, 10)
        self.colour = torch.nn.Linear(CELL_DIM, len(COLOURS))

    def cell_features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 4, CELL_DIM) in cell order (top-left, top-right, bottom-left, bottom-right)."""
        grid = self.body(images)  # (N, 128, 2, 2); row-major flatten gives the cell order
        return self.cell(grid.flatten(2).transpose(1, 2))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """FID/KID features of images in [-1, 1]: the four cell embeddings, concatenated."""
        return self.cell_features(images).flatten(1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cells = self.cell_features(images)
        return self.presence(cells).squeeze(-1), self.digit(cells), self.colour(cells)

    def score(self, images: torch.Tensor, prompts: list[Prompt]) -> dict[str, float]:
        """GenEval-style scores of images (in [-1, 1]) for their prompts (see ``score_prompts``)."""
        return score_prompts(self, images, prompts)

    @torch.no_grad()
    def detect(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        presence, digit, colour = self(images)
        return torch.where(presence > 0, digit.argmax(-1), -1), colour.argmax(-1)


def load_scene_judge(folder=None) -> SceneJudge:
    """The bundled judge (``weights/scene-judge``, made by the GPU run) or one from ``folder``."""
    from effdiff.zoo.checkpoints import load_classifier
    from effdiff.zoo.load import WEIGHTS

    return load_classifier(folder or WEIGHTS / "scene-judge", SceneJudge)


def judge_loss(judge: SceneJudge, images: torch.Tensor, digits: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    """Presence BCE on every cell, digit and colour cross-entropy on the occupied ones."""
    presence, digit, colour = judge(images)
    present = digits >= 0
    loss = torch.nn.functional.binary_cross_entropy_with_logits(presence.float(), present.float())
    if present.any():
        loss = loss + torch.nn.functional.cross_entropy(digit[present].float(), digits[present])
        loss = loss + torch.nn.functional.cross_entropy(colour[present].float(), colours[present])
    return loss


@torch.no_grad()
def head_accuracy(judge: Detector, images: torch.Tensor, digits: torch.Tensor, colours: torch.Tensor,
                  batch: int = 500) -> dict[str, float]:
    """Per-head accuracy: presence over all cells, digit and colour over the truly occupied cells."""
    found = [judge.detect(chunk) for chunk in images.split(batch)]
    got_digit = torch.cat([d for d, _ in found]).to(digits.device)
    got_colour = torch.cat([c for _, c in found]).to(digits.device)
    present = digits >= 0
    return {
        "presence": ((got_digit >= 0) == present).float().mean().item(),
        "digit": (got_digit[present] == digits[present]).float().mean().item(),
        "colour": (got_colour[present] == colours[present]).float().mean().item(),
    }


@torch.no_grad()
def heldout_accuracy(judge: Detector, bundle: dict, n: int | None = None, seed: int = 0,
                     device: torch.device | str = "cpu") -> dict[str, float]:
    """Accuracy on ``n`` clean scenes rendered from the held-out digits (never seen in training).

    ``n`` defaults to ``EFFDIFF_JUDGE_HELDOUT`` or 2,000 (8,000 cells); CPU dry runs set it lower.
    """
    from effdiff.zoo.scene_data import SceneSampler

    n = n or int(os.environ.get("EFFDIFF_JUDGE_HELDOUT", "2000"))
    sampler = SceneSampler(bundle, device, split="heldout")
    images, digits, colours = sampler.labelled_batch(n, torch.Generator().manual_seed(seed), augment=False)
    return head_accuracy(judge, images, digits, colours)


@torch.no_grad()
def correct(judge: Detector, images: torch.Tensor, prompts: list[Prompt], batch: int = 500) -> list[bool]:
    """Whether each image (in [-1, 1]) shows its prompt, as the judge reads it."""
    found = [judge.detect(chunk) for chunk in images.split(batch)]
    digits = torch.cat([d for d, _ in found]).cpu().numpy()
    colours = torch.cat([c for _, c in found]).cpu().numpy()
    return [satisfies(p, d, c) for p, d, c in zip(prompts, digits, colours, strict=True)]


def score_prompts(judge: Detector, images: torch.Tensor, prompts: list[Prompt]) -> dict[str, float]:
    """GenEval-style scores of images (in [-1, 1]) for their prompts: per category and ``overall``."""
    return score_by_category(prompts, correct(judge, images, prompts))
