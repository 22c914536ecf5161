"""Pruning tiny random U-Nets and DiTs: the forward still runs at the same output shape, the MAC budget is met,
attention keeps whole heads (at least one), the importance decides which channels go (deterministically), and
impossible budgets and unknown architectures are refused."""

from __future__ import annotations

import copy

import pytest
import torch
from _teacher import tiny_teacher

from effdiff.adapters import adapter_for
from effdiff.compress.importance import accumulate_taylor_gradients
from effdiff.compress.prune import _largest_grouping, call_macs, prune_in_place, prune_to_macs
from effdiff.distill.trainer import denoiser_call

pytest.importorskip("torch_pruning")


def with_gradients(kind: str) -> torch.nn.Module:
    pipe = tiny_teacher(kind)
    model = copy.deepcopy(pipe.denoiser)
    gen = torch.Generator().manual_seed(0)
    images, text = torch.randn(4, 1, 32, 32, generator=gen), torch.randn(4, 8, 384, generator=gen)
    accumulate_taylor_gradients(model, denoiser_call(model, kind == "dit"), images, text,
                                pipe.scheduler.alphas_cumprod.float(), "v_prediction", stride=100, generator=gen)
    return model


@pytest.mark.parametrize("kind", ["sd", "dit"])
@pytest.mark.parametrize("importance", ["taylor", "magnitude"])
def test_a_pruned_model_runs_at_the_same_shape_under_its_mac_budget(kind, importance):
    model = with_gradients(kind)
    call = adapter_for(model).example_call(2)
    pruned, facts = prune_to_macs(model, 0.6, importance)
    assert pruned(**call)[0].shape == model(**call)[0].shape
    assert facts["macs_fraction"] <= 0.6 and call_macs(pruned) < call_macs(model)
    assert facts["params_fraction"] < 1.0
    for _, attn in adapter_for(pruned).attention():
        assert attn.heads >= 1 and attn.to_q.out_features % attn.heads == 0


def test_the_importance_decides_which_channels_stay_and_is_deterministic():
    kept = {}
    for importance in ("taylor", "taylor", "magnitude"):
        model = with_gradients("sd")
        prune_in_place(model, 0.3, importance)
        kept.setdefault(importance, []).append(model.conv_in.weight.detach().clone())
    assert torch.equal(*kept["taylor"])
    assert not torch.equal(kept["taylor"][0], kept["magnitude"][0])


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_the_kept_channels_are_the_slice_of_the_original_each_pruned_layer_starts_as(allocation):
    """Feature distillation of a pruned model reads ``kept``: a pruned layer's output channel j is the original's
    kept[j], so its bias (and a first layer's whole weight) is exactly that slice of the original's."""
    model = with_gradients("sd")
    original = copy.deepcopy(model)
    kept = prune_in_place(model, 0.3, "taylor", allocation)
    layers = dict(model.named_modules())
    before = dict(original.named_modules())
    assert len(kept["conv_in"]) == model.conv_in.out_channels  # global allocation may leave it whole
    assert torch.equal(model.conv_in.weight, original.conv_in.weight[kept["conv_in"]])
    with_bias = [name for name in kept if getattr(layers[name], "bias", None) is not None]
    assert len(with_bias) > 10
    assert any(len(kept[name]) < before[name].bias.shape[0] for name in with_bias)
    for name in with_bias:
        assert kept[name] == sorted(kept[name]) and len(kept[name]) == layers[name].bias.shape[0]
        assert torch.equal(layers[name].bias, before[name].bias[kept[name]]), name


def kept_widths(model: torch.nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def test_global_allocation_meets_the_budget_and_prunes_layers_unevenly():
    """Uniform allocation takes the same share from every layer group; a global ranking takes more where the
    importance is lower, so the kept shares differ between groups."""
    original = kept_widths(with_gradients("sd"))
    shares = {}
    for allocation in ("uniform", "global"):
        model = with_gradients("sd")
        call = adapter_for(model).example_call(2)
        pruned, facts = prune_to_macs(model, 0.6, "taylor", allocation=allocation)
        assert facts["macs_fraction"] <= 0.6 and pruned(**call)[0].shape == model(**call)[0].shape
        shares[allocation] = {round(k / n, 2) for k, n in zip(kept_widths(pruned), original, strict=True) if k != n}
    assert len(shares["global"]) > len(shares["uniform"])
    with pytest.raises(ValueError, match="allocation must be one of uniform, global"):
        prune_in_place(with_gradients("sd"), 0.3, "taylor", "layerwise")


def test_the_bundled_unet_keeps_its_attention_pooled_text_embedding_whole():
    """tiny-sd adds a text embedding pooled by attention (``add_embedding``), which reshapes by a fixed head
    width: pruned, it broke the forward until the adapter kept it."""
    import effdiff

    model = effdiff.load("tiny-sd").denoiser
    pruned, facts = prune_to_macs(model, 0.6, "magnitude", trials=3)
    assert facts["macs_fraction"] <= 0.6
    assert pruned.add_embedding.state_dict().keys() == model.add_embedding.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(pruned.add_embedding.state_dict().values(),
                                                 model.add_embedding.state_dict().values(), strict=True))


def test_regrouping_keeps_channels_per_group():
    assert _largest_grouping(32, 1) == 32 and _largest_grouping(33, 2) == 11 and _largest_grouping(1, 2) == 1


def test_budgets_outside_zero_one_and_unknown_architectures_are_refused():
    model = tiny_teacher("sd").denoiser
    for target in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"fraction of the original's MACs in \(0, 1\)"):
            prune_to_macs(model, target, "taylor")
    with pytest.raises(ValueError, match="importance must be one of taylor, magnitude"):
        prune_in_place(copy.deepcopy(model), 0.3, "random")
    with pytest.raises(ValueError, match="unsupported backbone Linear"):
        prune_in_place(torch.nn.Linear(4, 4), 0.3, "magnitude")
    from diffusers import DiTTransformer2DModel

    dit = DiTTransformer2DModel(num_attention_heads=1, attention_head_dim=8, in_channels=1, num_layers=1,
                                sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    with pytest.raises(ValueError, match="no pruning plan for DiTTransformer2DModel yet"):
        prune_in_place(dit, 0.3, "magnitude")
