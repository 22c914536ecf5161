"""The bundled ``mnist-features`` classifier: an accurate judge, and a feature space in which FID separates."""

from __future__ import annotations

import pytest
import torch

from effdiff.eval.distribution import DistributionJudge
from effdiff.zoo.data import NUM_CLASSES, load_digits


@pytest.fixture(scope="module")
def judge():
    return DistributionJudge.bundled(subsets=10)


@pytest.fixture(scope="module")
def split():
    return load_digits()


def test_classifier_accuracy_on_heldout_digits(judge, split):
    """> 95 % on all 1,000 held-out digits, and on every class (features are shared with the FID below)."""
    classifier = judge.features.classifier
    with torch.no_grad():
        predicted = classifier.head(judge.reference_features).argmax(1)
    labels = split.heldout_labels
    assert (predicted == labels).float().mean() > 0.95
    for digit in range(NUM_CLASSES):
        assert (predicted[labels == digit] == digit).float().mean() > 0.85, digit
    # the judge's features are those of the images the split holds, not a stale or reordered copy
    with torch.no_grad():
        direct = classifier(split.heldout_images[::97])
    torch.testing.assert_close(direct, classifier.head(judge.reference_features[::97]), atol=1e-4, rtol=1e-4)


def test_real_vs_real_far_below_real_vs_noise(judge, split):
    floor = judge.floor(300)  # two disjoint 300-digit parts of the held-out set
    noise = judge.score(torch.rand(300, 1, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert floor["n_generated"] == floor["n_reference"] == 300
    assert floor["fid"] * 20 < noise["fid"]
    # unseen real digits from the training split score near the floor too
    order = torch.randperm(len(split.train_images), generator=torch.Generator().manual_seed(0))[:300]
    train = judge.score((split.train_images[order] + 1) / 2)
    assert train["fid"] < 3 * floor["fid"] and train["fid"] * 20 < noise["fid"]
    assert train["kid"] * 20 < noise["kid"]


def test_fid_sees_a_collapsed_class_mix(judge, split):
    """Real but all the same digit (mode collapse) is as far from the reference as noise, not near the floor."""
    ones = (split.train_images[split.train_labels == 1][:300] + 1) / 2
    assert judge.score(ones)["fid"] > 50 * judge.floor(300)["fid"]
