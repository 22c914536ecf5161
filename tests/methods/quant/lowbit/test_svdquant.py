import pytest
import torch
from conftest import sample
from torch import nn

import effdiff
from effdiff import RecipeError
from effdiff.methods.quant.lowbit.base import forget_calibrations
from effdiff.methods.quant.lowbit.fake import Observer
from effdiff.methods.quant.lowbit.ptq import naive_layer
from effdiff.methods.quant.lowbit.svdquant import low_rank_split, smoothing, svd_layer

FAST = "prompts=2,steps=4"


pytestmark = pytest.mark.usefixtures("fresh_quant_memo")


def test_smoothing_keeps_the_product():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(10, 6, generator=gen), torch.randn(4, 6, generator=gen)
    lam = smoothing(x.abs().amax(0), w.abs().amax(0), 0.5)
    assert torch.allclose((x / lam) @ (w * lam).T, x @ w.T, atol=1e-5)


def test_low_rank_split_takes_the_top_directions():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 48, generator=gen)
    w[:, 3] *= 40  # an outlier input channel: one dominant direction
    up, down, residual = low_rank_split(w, 4)
    assert up.dtype == torch.bfloat16 and up.shape == (32, 4) and down.shape == (4, 48)
    assert torch.allclose(up.float() @ down.float() + residual, w, atol=1e-4)
    sigma = torch.linalg.svdvals(w)
    assert torch.linalg.matrix_norm(residual, ord=2) < 1.05 * sigma[4]
    assert residual.abs().max() < 0.2 * w.abs().max()


@pytest.mark.parametrize("conv", [False, True])
def test_outlier_channels_hurt_svdquant_far_less_than_naive_w4a4(conv):
    torch.manual_seed(0)
    module = nn.Conv2d(64, 32, 3, padding=1) if conv else nn.Linear(64, 32)
    x = torch.randn(8, 64, 6, 6) if conv else torch.randn(8, 20, 64)
    channel = (slice(None), 5) if conv else (..., 5)
    x[channel] *= 30  # an activation outlier channel, as in diffusion models' activations
    with torch.no_grad():
        module.weight[:, 9] *= 20  # and an outlier weight column
    expected = module(x).detach()
    observer = Observer(conv=conv, per_channel=True)
    observer.update(x)
    naive = naive_layer(module, observer, 4, 4, "minmax", 100.0).layer(module)
    svd = svd_layer(module, observer.absmax, 4, 4, rank=8, alpha=0.5, group=64).layer(module)
    with torch.no_grad():
        naive_err = (naive(x) - expected).pow(2).mean()
        svd_err = (svd(x) - expected).pow(2).mean()
    assert svd_err < 0.25 * naive_err


def test_applies_restores_and_counts_the_branch(tiny_pipe):
    baseline = sample(tiny_pipe, steps=4)
    effdiff.accelerate(tiny_pipe, f"svdquant:rank=2,group=8,{FAST}")
    method = tiny_pipe.effdiff.methods[0]
    out = sample(tiny_pipe, steps=4)
    assert torch.isfinite(out).all() and not torch.equal(out, baseline)
    record = next(iter(method.layers.values()))
    assert record.down.dtype == torch.bfloat16 and record.act_group == 8 and record.symmetric
    assert method.size()["records_bytes"] > sum(r.codes.numel() for r in method.layers.values())
    assert "simulated" in tiny_pipe.effdiff.describe()
    tiny_pipe.effdiff.remove()
    assert torch.equal(sample(tiny_pipe, steps=4), baseline)


def test_save_reload_identical(tiny_sd, tmp_path):
    path = tmp_path / "svd.safetensors"
    effdiff.accelerate(tiny_sd, f"svdquant:rank=2,{FAST}")
    out = sample(tiny_sd, steps=4)
    tiny_sd.effdiff.methods[0].save(str(path))
    tiny_sd.effdiff.remove()
    forget_calibrations()
    effdiff.accelerate(tiny_sd, f"svdquant:rank=2,{FAST},calibration={path}")
    assert torch.equal(sample(tiny_sd, steps=4), out)


def test_composes_with_dpmpp2m_and_deepcache(tiny_sd):
    effdiff.accelerate(tiny_sd, f"dpmpp2m:steps=4+svdquant:{FAST}+deepcache:interval=2")
    assert [m.name for m in tiny_sd.effdiff.methods] == ["dpmpp2m", "svdquant", "deepcache"]
    assert torch.isfinite(sample(tiny_sd, steps=4)).all()


@pytest.mark.parametrize("recipe", ["svdquant:wbits=16", "svdquant:alpha=2", "svdquant:rank=0"])
def test_bad_settings_refused(recipe):
    with pytest.raises(RecipeError):
        effdiff.accelerate(__import__("conftest").make_tiny_sd(), recipe)
