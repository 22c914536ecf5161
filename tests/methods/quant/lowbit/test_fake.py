import pytest
import torch
from torch import nn

from effdiff import RecipeError
from effdiff.methods.quant.lowbit.fake import (
    DynamicActivation,
    FakeQuantLayer,
    Observer,
    StaticActivation,
    check_bits,
    grid_from_range,
    levels,
    value_range,
    weight_grid,
)
from effdiff.methods.quant.lowbit.packed import pack, unpack
from effdiff.patches import PatchLog


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_round_trip_error_at_most_half_a_step(bits, symmetric):
    gen = torch.Generator().manual_seed(bits)
    x = torch.rand(5000, generator=gen) * 7 - 2  # in [-2, 5]
    grid = grid_from_range(x.min(), x.max(), bits, symmetric)
    codes = grid.codes(x)
    qmin, qmax = levels(bits, symmetric)
    assert codes.min() >= qmin and codes.max() <= qmax and torch.equal(codes, codes.round())
    assert (grid.fake(x) - x).abs().max() <= grid.scale / 2 * (1 + 1e-5)
    assert grid.fake(torch.zeros(1)).item() == 0.0  # zero is exactly representable
    outside = torch.tensor([100.0])
    assert grid.fake(outside).item() < 100.0  # clipped, not wrapped


def test_per_channel_weight_grid_bounds_each_channel():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, 3, 3, generator=gen) * torch.arange(1, 7).reshape(6, 1, 1, 1)
    grid, scale, zero = weight_grid(weight, 4)
    assert scale.shape == (6, 1) and zero.shape == (6, 1)
    err = (grid.fake(weight) - weight).abs().flatten(1).amax(1)
    assert torch.all(err <= scale[:, 0] / 2 * (1 + 1e-5))
    assert scale[5, 0] > 4 * scale[0, 0]  # channels really have their own steps


def test_split_segments_give_each_half_its_own_step():
    gen = torch.Generator().manual_seed(0)
    weight = torch.cat([torch.randn(4, 3, generator=gen) * 0.01, torch.randn(4, 3, generator=gen) * 10], 1)
    joint, _, _ = weight_grid(weight, 4)
    split, scale, _ = weight_grid(weight, 4, segments=[0, 3, 6])
    assert scale.shape == (4, 2)
    small = weight[:, :3]
    assert (split.fake(weight)[:, :3] - small).abs().max() < 0.1 * (joint.fake(weight)[:, :3] - small).abs().max()


def test_percentile_and_mse_ranges_clip_outliers():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(1, 20000, generator=gen)
    values[0, 0] = 80.0
    lo, hi = value_range(values, "minmax", 4, False)
    plo, phi = value_range(values, "percentile", 4, False, percentile=99.9)
    mlo, mhi = value_range(values, "mse", 4, False)
    assert hi.item() == 80.0 and phi.item() < 5 and mhi.item() < hi.item()
    minmax_err = (grid_from_range(lo, hi, 4, False).fake(values) - values).pow(2).sum()
    mse_err = (grid_from_range(mlo, mhi, 4, False).fake(values) - values).pow(2).sum()
    assert mse_err < minmax_err


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_pack_round_trip_and_size(bits):
    qmin, qmax = levels(bits, False)
    codes = torch.randint(qmin, qmax + 1, (7, 9), generator=torch.Generator().manual_seed(1)).float()
    packed = pack(codes, bits, qmin)
    assert packed.dtype == torch.uint8
    per_byte = 8 // bits if 8 % bits == 0 else 1
    assert packed.numel() == -(-codes.numel() // per_byte)
    assert torch.equal(unpack(packed, bits, qmin, codes.numel()).reshape(codes.shape), codes)


def test_observer_tracks_extremes_and_segments():
    obs = Observer(conv=True, segments=[0, 2, 5], keep_values=True)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 4, 4, generator=gen), torch.randn(3, 5, 4, 4, generator=gen) * 3
    obs.update(a)
    obs.update(b)
    both = torch.cat([a, b])
    assert torch.equal(obs.lo, torch.stack([both[:, :2].min(), both[:, 2:].min()]))
    assert torch.equal(obs.hi, torch.stack([both[:, :2].max(), both[:, 2:].max()]))
    grid = obs.grid(8, "minmax")
    act = StaticActivation(grid, [0, 2, 5], conv=True)
    step = grid.scale.repeat_interleave(torch.tensor([2, 3])).reshape(1, 5, 1, 1)
    assert torch.all((act(both) - both).abs() <= step / 2 * (1 + 1e-5))


def test_dynamic_activation_per_token_group_bound():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, 70, generator=gen)
    x[..., 5] *= 100  # an outlier channel only hurts its own group
    out = DynamicActivation(4, 64, conv=False)(x)
    first, second = x[..., :64], x[..., 64:]
    assert torch.all((out[..., :64] - first).abs() <= first.abs().amax(-1, keepdim=True) / 7 / 2 * (1 + 1e-5))
    assert torch.all((out[..., 64:] - second).abs() <= second.abs().amax(-1, keepdim=True) / 7 / 2 * (1 + 1e-5))


@pytest.mark.parametrize("module", [nn.Linear(6, 4), nn.Conv2d(3, 5, 3, padding=1), nn.Conv2d(3, 2, 3, stride=2)])
def test_float_layer_is_bit_identical_and_patches_restore(module):
    torch.manual_seed(0)
    x = torch.randn(2, 6) if isinstance(module, nn.Linear) else torch.randn(2, 3, 8, 8)
    expected = module(x)
    patches = PatchLog()
    patches.attr(module, "forward", FakeQuantLayer(module, module.weight.detach()))
    assert torch.equal(module(x), expected)
    patches.restore()
    assert "forward" not in vars(module) and torch.equal(module(x), expected)


def test_smoothing_and_low_rank_algebra_is_exact_without_quantization():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 5, 5)
    lam = torch.tensor([0.5, 2.0, 1.0, 4.0])
    smoothed = conv.weight.detach() * lam.reshape(1, 4, 1, 1)
    down = smoothed[:2].clone()  # a rank-2 "branch" carrying two output rows through a 1x1 conv
    up = torch.zeros(6, 2, 1, 1)
    up[0, 0, 0, 0] = up[1, 1, 0, 0] = 1.0
    residual = smoothed.clone()
    residual[:2] = 0
    layer = FakeQuantLayer(conv, residual, smooth=lam, low_rank=(down, up))
    assert torch.allclose(layer(x), conv(x), atol=1e-5)


def test_bad_bit_widths_refused():
    check_bits("ptq", 4, 16)
    for wbits, abits in [(9, 8), (1, 8), (4, 12)]:
        with pytest.raises(RecipeError, match="2 to 8"):
            check_bits("ptq", wbits, abits)
