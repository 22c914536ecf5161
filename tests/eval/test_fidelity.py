import pytest
import torch

from effdiff.eval.fidelity import fidelity, psnr, ssim


def test_identical_images_are_perfect():
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert psnr(x, x) == 100.0
    assert ssim(x, x) == pytest.approx(1.0)


def test_psnr_matches_definition():
    x = torch.full((2, 1, 16, 16), 0.5)
    y = x + 0.1  # mse 0.01 → 20 dB
    assert psnr(y, x) == pytest.approx(20.0, abs=1e-4)  # 0.1 is not exact in float32


def test_more_noise_scores_worse():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 32, 32, generator=g)
    noise = torch.randn(x.shape, generator=g)
    small, large = fidelity((x + 0.01 * noise).clamp(0, 1), x), fidelity((x + 0.2 * noise).clamp(0, 1), x)
    assert small["psnr"] > large["psnr"] and small["ssim"] > large["ssim"]


def test_shape_mismatch_is_a_sentence():
    with pytest.raises(ValueError, match="differ"):
        psnr(torch.zeros(2, 1, 8, 8), torch.zeros(3, 1, 8, 8))
