"""LoRA deltas: a fresh delta changes nothing, the merged weight computes what the hooked layer computes, files
round-trip, and a file for another model is refused by layer name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from effdiff.distill import lora


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 12, 3, padding=1, stride=2), nn.SiLU(), nn.Flatten(), nn.Linear(12 * 4 * 4, 10))


def trained_deltas(net: nn.Module, rank: int = 2) -> nn.ModuleDict:
    deltas = lora.attach(net, rank, seed=1)
    with torch.no_grad():
        for delta in deltas.values():
            delta.up.normal_(0, 0.1)
    return deltas


def test_a_fresh_delta_leaves_the_output_unchanged():
    net, x = model(), torch.randn(2, 8, 8, 8)
    before = net(x)
    lora.attach(net, 2, seed=0)
    assert torch.equal(net(x), before)


def test_targets_skip_layers_narrower_than_the_rank():
    net = model()
    assert [name for name, _ in lora.target_layers(net, 4)] == ["0", "3"]
    assert [name for name, _ in lora.target_layers(net, 8)] == ["3"]  # the conv has 8 inputs
    assert [name for name, _ in lora.target_layers(net, 4, exclude="^3$")] == ["0"]


def test_merged_weights_compute_what_the_hooked_layers_compute(tmp_path):
    hooked, x = model(), torch.randn(2, 8, 8, 8)
    deltas = trained_deltas(hooked)
    expected = hooked(x)
    path = lora.save(deltas, tmp_path / "lora.safetensors", {"teacher": "test"})
    loaded, scale, metadata = lora.load(path)
    assert metadata["teacher"] == "test" and metadata["rank"] == "2"
    assert lora.parameter_count(loaded) == sum(p.numel() for p in deltas.parameters())
    plain = model()
    for module, weight in lora.merged_weights(plain, loaded, scale):
        module.weight = nn.Parameter(weight)
    assert torch.allclose(plain(x), expected, atol=1e-5)
    assert not torch.allclose(model()(x), expected, atol=1e-3)


def test_a_lora_for_another_model_is_refused_by_layer(tmp_path):
    path = lora.save(trained_deltas(model()), tmp_path / "lora.safetensors", {})
    deltas, scale, _ = lora.load(path)
    other = nn.Sequential(nn.Conv2d(8, 16, 3), nn.SiLU(), nn.Flatten(), nn.Linear(4, 10))
    with pytest.raises(lora.LoRAError, match="'0'.*shape"):
        lora.merged_weights(other, deltas, scale)
    with pytest.raises(lora.LoRAError, match="does not have"):
        lora.merged_weights(nn.Sequential(nn.Conv2d(8, 12, 3)), deltas, scale)


def test_an_unreadable_file_is_refused(tmp_path):
    bad = tmp_path / "lora.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(lora.LoRAError, match="not a readable"):
        lora.load(bad)
