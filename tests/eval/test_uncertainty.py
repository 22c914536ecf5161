import numpy as np
import pytest
import torch

from effdiff.eval.uncertainty import Reference, SampleScores, bootstrap, fid


def _features(n: int, shift: float = 0.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=gen).abs() + shift  # SiLU-like, non-negative features


def test_fid_matches_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance

    from effdiff.eval.distribution import _Given

    real, fake = _features(300, seed=1), _features(200, shift=0.3, seed=2)
    metric = FrechetInceptionDistance(feature=_Given(16), normalize=True)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    ours = fid(fake.double().numpy(), Reference.of(real))
    assert ours == pytest.approx(float(metric.compute()), rel=1e-3)


def test_same_seeds_same_samples_is_a_tie_and_a_shift_is_not():
    ref = Reference.of(_features(400, seed=1))
    correct = torch.ones(100, dtype=torch.bool)
    base = SampleScores(_features(100, seed=3), correct, ref)
    same = bootstrap(SampleScores(_features(100, seed=3), correct, ref), base, resamples=50)
    assert same["fid_delta"] == 0 and same["fid_delta_ci"] == [0.0, 0.0] and same["fid_vs_baseline"] == "tie"
    shifted = bootstrap(SampleScores(_features(100, shift=1.0, seed=3), correct, ref), base, resamples=50)
    assert shifted["fid_vs_baseline"] == "higher" and shifted["fid_delta_ci"][0] > 0
    assert shifted["prompt_accuracy_vs_baseline"] == "tie" and shifted["prompt_accuracy_ci"] == [1.0, 1.0]


def test_accuracy_interval_brackets_the_rate():
    ref = Reference.of(_features(100, seed=1))
    correct = torch.arange(200) % 4 != 0  # 75 % right
    result = bootstrap(SampleScores(_features(200, seed=2), correct, ref), resamples=200)
    low, high = result["prompt_accuracy_ci"]
    assert low < 0.75 < high and high - low < 0.2 and "fid_vs_baseline" not in result


def test_kid_is_near_zero_for_the_same_distribution_and_positive_for_another():
    ref = Reference.of(_features(400, seed=1))
    correct = torch.ones(200, dtype=torch.bool)
    same = SampleScores(_features(200, seed=5), correct, ref).on(np.arange(200))["kid_e3"]
    other = SampleScores(_features(200, shift=0.5, seed=5), correct, ref).on(np.arange(200))["kid_e3"]
    assert abs(same) < other / 20 and other > 0


def test_unpaired_sizes_are_refused():
    ref = Reference.of(_features(50, seed=1))
    with pytest.raises(ValueError, match="as many baseline samples"):
        bootstrap(SampleScores(_features(10), torch.ones(10, dtype=torch.bool), ref),
                  SampleScores(_features(12), torch.ones(12, dtype=torch.bool), ref))
