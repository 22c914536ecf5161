"""The scene scorer: 1.0 on rendered ground truth, low on noise and on mismatched prompts.

The scoring logic is tested with an exact template-matching oracle; the trained judge is tested the same
way, plus its held-out accuracy, once its weights are bundled.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from effdiff.zoo.data import load_digits
from effdiff.zoo.scene_data import _glyphs
from effdiff.zoo.scene_judge import SceneJudge, head_accuracy, score_prompts
from effdiff.zoo.scenes import CATEGORIES, CELL, MAX_JITTER, eval_prompts, palette_tensor, render_layouts, sample_layout

JUDGE_WEIGHTS = "scene-judge"


class OracleJudge:
    """Reads rendered scenes exactly: ink means presence, the hue gives the colour, nearest glyph the digit."""

    def __init__(self, glyphs: torch.Tensor, labels: torch.Tensor) -> None:
        templates, owners = [], []
        for dy in range(-MAX_JITTER, MAX_JITTER + 1):
            for dx in range(-MAX_JITTER, MAX_JITTER + 1):
                cells = torch.zeros(len(glyphs), CELL, CELL)
                y, x = 2 + dy, 2 + dx
                cells[:, y : y + 28, x : x + 28] = glyphs.float() / 255
                templates.append(cells.flatten(1))
                owners.append(labels)
        self.templates, self.owners = torch.cat(templates), torch.cat(owners)
        palette = palette_tensor()
        self.hues = palette / palette.norm(dim=1, keepdim=True)

    def detect(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rgb = (images + 1) / 2
        cells = rgb.unfold(2, CELL, CELL).unfold(3, CELL, CELL)  # (N, 3, 2, 2, 32, 32)
        cells = cells.permute(0, 2, 3, 1, 4, 5).reshape(len(images), 4, 3, CELL, CELL)
        ink = cells.amax(dim=(2, 3, 4)) > 0.05
        total = cells.sum(dim=(3, 4))  # (N, 4, 3): the cell's colour, weighted by ink
        colour = (total / total.norm(dim=-1, keepdim=True).clamp(min=1e-6)) @ self.hues.T
        tint = palette_tensor()[colour.argmax(-1)]  # undo the tint to get the glyph back
        grey = (cells * tint[..., None, None]).sum(2) / (tint * tint).sum(-1)[..., None, None]
        nearest = torch.cdist(grey.flatten(2).flatten(0, 1), self.templates).argmin(-1)
        digits = self.owners[nearest].view(len(images), 4)
        return torch.where(ink, digits, -1), colour.argmax(-1)


@pytest.fixture(scope="module")
def heldout():
    split = load_digits()
    return _glyphs(split.heldout_images), split.heldout_labels


@pytest.fixture(scope="module")
def ground_truth(heldout):
    """The fixed evaluation prompts, each rendered from held-out digits as a scene that shows it."""
    prompts = eval_prompts()[::4]
    rng = np.random.default_rng(0)
    layouts = [sample_layout(p, rng) for p in prompts]
    digits, colours = np.stack([d for d, _ in layouts]), np.stack([c for _, c in layouts])
    return prompts, render_layouts(digits, colours, *heldout, seed=0)


@pytest.fixture(scope="module")
def oracle(heldout):
    return OracleJudge(*heldout)


def test_oracle_gives_ground_truth_full_marks(oracle, ground_truth):
    prompts, images = ground_truth
    scores = score_prompts(oracle, images, prompts)
    assert set(scores) == {*CATEGORIES, "overall"}
    assert scores == {k: 1.0 for k in scores}


def test_noise_and_mismatched_prompts_score_low(oracle, ground_truth):
    prompts, images = ground_truth
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert score_prompts(oracle, noise, prompts)["overall"] < 0.2
    assert score_prompts(oracle, torch.full_like(images, -1.0), prompts)["overall"] == 0.0  # blank canvases
    shuffled = prompts[1:] + prompts[:1]  # every image judged against another prompt (same category mostly)
    assert score_prompts(oracle, images, shuffled)["overall"] < 0.4


def test_judge_shapes_and_features():
    judge = SceneJudge().eval()
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    presence, digit, colour = judge(images)
    assert presence.shape == (3, 4) and digit.shape == (3, 4, 10) and colour.shape == (3, 4, 5)
    assert judge.features(images).shape == (3, SceneJudge.feature_dim)
    digits, colours = judge.detect(images)
    assert digits.shape == colours.shape == (3, 4) and digits.min() >= -1


def test_head_accuracy_counts_digit_and_colour_on_occupied_cells_only(oracle, heldout):
    digits = torch.tensor([[1, -1, 2, -1], [-1, -1, -1, 9]])
    colours = torch.tensor([[0, 3, 1, 3], [4, 4, 4, 2]])
    images = render_layouts(digits.numpy(), colours.numpy(), *heldout, seed=1)
    assert head_accuracy(oracle, images, digits, colours) == {"presence": 1.0, "digit": 1.0, "colour": 1.0}


def _bundled_judge():
    from effdiff.zoo.checkpoints import read_record
    from effdiff.zoo.load import WEIGHTS
    from effdiff.zoo.scene_judge import load_scene_judge

    folder = WEIGHTS / JUDGE_WEIGHTS
    if not (folder / "model.safetensors").exists():
        pytest.skip(f"the scene judge is not trained yet ({folder} is missing: tools/train_scenes_gpu.sh makes it)")
    return load_scene_judge(), read_record(folder)


def test_trained_judge_is_accurate_on_held_out_scenes():
    from effdiff.zoo.scene_data import scene_bundle
    from effdiff.zoo.scene_judge import heldout_accuracy

    judge, record = _bundled_judge()
    assert all(v >= 0.95 for v in record["heldout_accuracy"].values()), json.dumps(record["heldout_accuracy"])
    measured = heldout_accuracy(judge, scene_bundle(), n=500)
    assert all(v >= 0.95 for v in measured.values()), measured


def test_trained_judge_scores_ground_truth_high_and_noise_low(ground_truth):
    judge, _ = _bundled_judge()
    prompts, images = ground_truth
    assert score_prompts(judge, images, prompts)["overall"] >= 0.9
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert score_prompts(judge, noise, prompts)["overall"] < 0.2
