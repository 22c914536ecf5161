import pytest
import torch

from effdiff.eval.accuracy import prompt_accuracy
from effdiff.eval.distribution import DistributionJudge


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Two OpenMP threads on a loaded 2-core machine slow small convolutions many-fold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def judge(one_thread):
    return DistributionJudge.bundled(subsets=20)


@pytest.fixture(scope="module")
def real_sample(judge):
    order = torch.randperm(len(judge.reference01), generator=torch.Generator().manual_seed(1))
    return judge.reference01[order[:100]]


def test_real_vs_real_far_below_real_vs_noise(judge, real_sample):
    noise = torch.rand(100, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    real, fake = judge.score(real_sample), judge.score(noise)
    floor = judge.floor(100)
    assert real["fid"] * 3 < fake["fid"]
    assert floor["fid"] * 3 < fake["fid"]
    assert real["kid"] * 3 < fake["kid"]
    assert floor["n_generated"] == floor["n_reference"] == 100


def test_floor_halves_are_disjoint_and_capped(judge):
    floor = judge.floor(5000)
    assert floor["n_generated"] == floor["n_reference"] == 500


def test_prompt_accuracy_on_real_digits(judge):
    from effdiff.zoo.data import load_digits

    split = load_digits()
    images01 = (split.heldout_images[::10] + 1) / 2
    labels = split.heldout_labels[::10]
    classifier = judge.features.classifier
    assert prompt_accuracy(images01, labels, classifier) > 0.9
    assert prompt_accuracy(images01, (labels + 1) % 10, classifier) < 0.2
    with pytest.raises(ValueError, match="requested digits"):
        prompt_accuracy(images01, labels[:3], classifier)


def test_matched_floor_has_the_generated_set_sizes_and_class_mix(judge):
    real = judge.reference01 * 2 - 1  # stand-in pool; the bench draws from the training split
    labels = torch.arange(len(real)) % 10
    floor = judge.matched_floor(real, labels, [d % 10 for d in range(50)])
    assert floor["n_generated"] == 50 and floor["n_reference"] == len(judge.reference01)
    with pytest.raises(ValueError, match="needs 6 real images of digit 3"):
        judge.matched_floor(real[:50], labels[:50], [3] * 6)
