"""Distribution quality: FID and KID of generated digits against the 1,000 held-out real digits.

Features come from the bundled classifier's 128-d penultimate layer (Inception cannot be downloaded
here, and it does not know 32×32 grey digits anyway). torchmetrics accepts a custom feature module,
so no torch-fidelity is needed. FID is biased by the sample count, so every score travels with a
*floor*: the same metric between two disjoint halves of the real held-out set, of the same size.
"""

from __future__ import annotations

import warnings
from collections import Counter

import torch
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

MAX_FLOOR_HALF = 500  # two disjoint halves of the 1,000 held-out digits


class DigitFeatures(torch.nn.Module):
    """Adapts the classifier to torchmetrics: images in [0, 1] in, (N, 128) features out."""

    def __init__(self, classifier: torch.nn.Module) -> None:
        super().__init__()
        self.classifier = classifier
        self.num_features = int(getattr(classifier, "feature_dim", 128))

    @torch.no_grad()
    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        if images01.shape[1] == 3:  # torchmetrics may probe with RGB; the classifier is grey
            images01 = images01.mean(1, keepdim=True)
        return self.classifier.features(images01.float() * 2 - 1)


class _Given(torch.nn.Module):
    """Pass-through "extractor": features are computed once by ``DigitFeatures`` and shared by FID and KID."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _metrics(num_features: int, subset_size: int, subsets: int):
    given = _Given(num_features)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # KID's "features kept in memory" notice
        fid = FrechetInceptionDistance(feature=given, reset_real_features=False, normalize=True)
        kid = KernelInceptionDistance(feature=given, subsets=subsets, subset_size=subset_size,
                                      reset_real_features=False, normalize=True)
    return fid, kid


def _score(fid: FrechetInceptionDistance, kid: KernelInceptionDistance, generated: torch.Tensor,
           n_reference: int) -> dict[str, float]:
    """Score against the real features already held by ``fid``/``kid`` (reset keeps them)."""
    if len(generated) < 2:
        raise ValueError("FID/KID need at least 2 generated images")
    fid.reset()
    kid.reset()
    kid.subset_size = min(len(generated), n_reference, 1000)
    fid.update(generated, real=False)
    kid.update(generated, real=False)
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std),
            "n_generated": len(generated), "n_reference": n_reference}


def _with_reference(reference: torch.Tensor, subsets: int):
    """FID and KID metrics holding the reference features."""
    if len(reference) < 2:
        raise ValueError("FID/KID need at least 2 reference images")
    fid, kid = _metrics(reference.shape[1], min(len(reference), 1000), subsets)
    fid.update(reference, real=True)
    kid.update(reference, real=True)
    return fid, kid


class DistributionJudge:
    """Scores generated images against a fixed real reference set, and gives the real-vs-real floor."""

    def __init__(self, classifier: torch.nn.Module, reference_m11: torch.Tensor, subsets: int = 50) -> None:
        self.features = DigitFeatures(classifier.eval())
        self.reference01 = (reference_m11.float() + 1) / 2
        self.subsets = subsets
        self._full = None
        self._reference_features: torch.Tensor | None = None

    def features_of(self, images01: torch.Tensor, batch: int = 250) -> torch.Tensor:
        return torch.cat([self.features(chunk) for chunk in images01.split(batch)])

    @property
    def reference_features(self) -> torch.Tensor:
        if self._reference_features is None:
            self._reference_features = self.features_of(self.reference01)
        return self._reference_features

    @classmethod
    def bundled(cls, subsets: int = 50) -> DistributionJudge:
        """The judge every effdiff number uses: bundled classifier, the 1,000 held-out digits."""
        from effdiff.zoo import load_feature_extractor
        from effdiff.zoo.data import load_digits

        return cls(load_feature_extractor(), load_digits().heldout_images, subsets)

    def score(self, generated01: torch.Tensor) -> dict[str, float]:
        """FID / KID of generated images (in [0, 1]) against the whole reference set."""
        return self.score_features(self.features_of(generated01))

    def score_features(self, features: torch.Tensor) -> dict[str, float]:
        """FID / KID of already extracted features (the bench shares them with its bootstrap)."""
        if self._full is None:
            self._full = _with_reference(self.reference_features, self.subsets)
        return _score(*self._full, features, len(self.reference01))

    def floor(self, n: int, seed: int = 0) -> dict[str, float]:
        """Real-vs-real FID/KID between two disjoint reference halves of ``n`` images each (capped)."""
        half = min(n, len(self.reference01) // 2, MAX_FLOOR_HALF)
        order = torch.randperm(len(self.reference01), generator=torch.Generator().manual_seed(seed))
        feats = self.reference_features
        first, second = feats[order[:half]], feats[order[half : 2 * half]]
        return _score(*_with_reference(first, self.subsets), second, half)

    def matched_floor(self, real_m11: torch.Tensor, real_labels: torch.Tensor, digits: list[int],
                      seed: int = 0) -> dict[str, float]:
        """FID/KID of real images from outside the reference, one of each digit in ``digits``, against it.

        The same set sizes and the same class mix as a score of generated images for those prompts, so
        the two are comparable (FID's bias depends on both sizes, and a random draw's class imbalance
        alone raises FID).
        """
        gen = torch.Generator().manual_seed(seed)
        picks = []
        for digit, count in sorted(Counter(digits).items()):
            pool = torch.nonzero(real_labels == digit).flatten()
            if count > len(pool):
                raise ValueError(f"a matched floor needs {count} real images of digit {digit}; have {len(pool)}")
            picks.append(pool[torch.randperm(len(pool), generator=gen)[:count]])
        return self.score((real_m11[torch.cat(picks)].float() + 1) / 2)
