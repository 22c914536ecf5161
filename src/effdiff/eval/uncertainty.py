"""Confidence intervals for the quality numbers: a bootstrap over the generated samples.

Why: at the bench's 100 samples, FID and accuracy move by more between two draws of seeds than between
many recipes, so a bare number ranks recipes by noise (an independent judge put DDIM-5 above DDIM-50).
Every FID / KID / accuracy therefore travels with a 95 % percentile interval from resampling the
generated images (the reference set stays fixed: it is the same for every row), and every recipe's
difference to the baseline gets a *paired* interval — the same resampled seeds on both sides, since
both sides were generated from the same seeds. A difference whose interval contains 0 is a tie.

FID here is recomputed from the shared features in float64 (torchmetrics' value is the point estimate;
this formula matches it to rounding, tested); KID is the unbiased MMD² with the cubic polynomial kernel
over the whole generated and reference sets, reported ×10³.
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
    """Point values, their 95 % intervals, and (given the baseline's scores on the same seeds) paired
    intervals of each difference to the baseline, with a verdict: tie when the interval holds 0."""
    n = len(scores)
    if baseline is not None and len(baseline) != n:
        raise ValueError(f"paired bootstrap needs as many baseline samples as samples, got {len(baseline)} and {n}")
    rng = np.random.default_rng(seed)
    everything = np.arange(n)
    point = scores.on(everything)
    base_point = baseline.on(everything) if baseline is not None else None
    draws: dict[str, list[float]] = {k: [] for k in point}
    deltas: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        value = scores.on(idx)
        for key, v in value.items():
            draws[key].append(v)
        if baseline is not None:
            base = baseline.on(idx)
            for key, v in value.items():
                deltas[key].append(v - base[key])
    out: dict[str, object] = {"kid_e3": point["kid_e3"], "bootstrap_resamples": resamples}
    for key in point:
        out[f"{key}_ci"] = _interval(draws[key])
        if base_point is not None:
            low, high = _interval(deltas[key])
            out[f"{key}_delta"] = point[key] - base_point[key]
            out[f"{key}_delta_ci"] = [low, high]
            out[f"{key}_vs_baseline"] = "tie" if low <= 0 <= high else ("higher" if low > 0 else "lower")
    return out
