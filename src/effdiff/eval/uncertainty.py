"""Confidence intervals for the quality numbers: a bootstrap over the generated samples.

Why: at the bench's 100 samples, FID and accuracy move by more between two draws of seeds than between
many recipes, so a bare number ranks recipes by noise (an independent judge put DDIM-5 above DDIM-50).
So every recipe's FID and accuracy get a *paired* bootstrap interval of their difference to the
baseline — the same resampled seeds on both sides, since both sides were generated from the same seeds
(the reference set stays fixed) — and a difference whose 95 % interval holds 0 is called a tie.
Accuracy, a mean, also gets its own percentile interval.

FID itself gets no interval, on purpose: resampling with replacement duplicates samples, and FID in
128 dimensions reads duplicates as lost diversity. Measured on 100 real digits: bootstrap replicates
averaged FID 8.6 around a point value of 1.4, with a spread of 3.6 against 0.27 across independent
draws (jackknife and Dirichlet weights inflate it as well). The paired difference cancels most of
that: on 20 pairs of independent real draws it called none different; it called 19 of 20 sets with
Gaussian noise (σ = 0.15, FID +4.6) worse.

FID here is recomputed from the shared features in float64 (torchmetrics' value is the point estimate;
this formula matches it to rounding, tested). KID is the unbiased MMD² with the cubic polynomial kernel
over the whole generated and reference sets, reported ×10³ without an interval; it reads negative for
real data too, because the bench asks for every digit equally often: a class-balanced sample has fewer
same-class pairs than the i.i.d. draws the estimator assumes (9/99 instead of 1/10 at 100 samples).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

CONFIDENCE = 0.95
RESAMPLES = 200


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


@dataclass(frozen=True)
class Reference:
    """What every score needs of the real set, computed once: mean, covariance and its square root, kernel mean."""

    features: np.ndarray
    mean: np.ndarray
    cov: np.ndarray
    cov_sqrt: np.ndarray
    kernel_mean: float  # mean of k(r, r') over pairs r ≠ r'

    @classmethod
    def of(cls, features: torch.Tensor) -> Reference:
        feats = features.double().numpy()
        cov = np.cov(feats, rowvar=False)
        k = _kernel(feats, feats)
        n = len(feats)
        return cls(feats, feats.mean(0), cov, _sqrtm_psd(cov), float((k.sum() - np.trace(k)) / (n * (n - 1))))


def _kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KID's polynomial kernel (x·y / d + 1)³."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def fid(generated: np.ndarray, ref: Reference) -> float:
    """Fréchet distance of the generated features' Gaussian to the reference's."""
    mean, cov = generated.mean(0), np.cov(generated, rowvar=False)
    cross = np.linalg.eigvalsh(ref.cov_sqrt @ cov @ ref.cov_sqrt)
    return float(((mean - ref.mean) ** 2).sum() + np.trace(cov) + np.trace(ref.cov)
                 - 2 * np.sqrt(np.clip(cross, 0, None)).sum())


class SampleScores:
    """FID, KID and accuracy of one set of generated samples, re-scorable on any resample of their indices."""

    def __init__(self, features: torch.Tensor, correct: torch.Tensor, ref: Reference) -> None:
        self.features = features.double().numpy()
        self.correct = correct.double().numpy()
        self.ref = ref
        self._k_gg = _kernel(self.features, self.features)
        self._k_gr_mean = _kernel(self.features, ref.features).mean(1)

    def __len__(self) -> int:
        return len(self.features)

    def on(self, idx: np.ndarray) -> dict[str, float]:
        n = len(idx)
        k_gg = self._k_gg[np.ix_(idx, idx)]
        kid = (k_gg.sum() - np.trace(k_gg)) / (n * (n - 1)) + self.ref.kernel_mean - 2 * self._k_gr_mean[idx].mean()
        return {"fid": fid(self.features[idx], self.ref), "kid_e3": 1e3 * float(kid),
                "prompt_accuracy": float(self.correct[idx].mean())}


def _interval(values: list[float]) -> list[float]:
    tail = (1 - CONFIDENCE) / 2 * 100
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def bootstrap(scores: SampleScores, baseline: SampleScores | None = None, resamples: int = RESAMPLES,
              seed: int = 0) -> dict[str, object]:
    """KID×10³, accuracy with its 95 % interval, and (given the baseline's scores on the same seeds) paired
    intervals of the FID and accuracy differences to the baseline with a verdict: tie when the interval holds 0."""
    n = len(scores)
    if baseline is not None and len(baseline) != n:
        raise ValueError(f"paired bootstrap needs as many baseline samples as samples, got {len(baseline)} and {n}")
    rng = np.random.default_rng(seed)
    everything = np.arange(n)
    point = scores.on(everything)
    accuracy, deltas = [], {"fid": [], "prompt_accuracy": []}
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        accuracy.append(float(scores.correct[idx].mean()))
        if baseline is not None:
            value, base = scores.on(idx), baseline.on(idx)
            for key in deltas:
                deltas[key].append(value[key] - base[key])
    out: dict[str, object] = {"kid_e3": point["kid_e3"], "prompt_accuracy_ci": _interval(accuracy),
                              "bootstrap_resamples": resamples}
    if baseline is not None:
        base_point = baseline.on(everything)
        for key, draws in deltas.items():
            low, high = _interval(draws)
            out[f"{key}_delta"] = point[key] - base_point[key]
            out[f"{key}_delta_ci"] = [low, high]
            out[f"{key}_vs_baseline"] = "tie" if low <= 0 <= high else ("higher" if low > 0 else "lower")
    return out
