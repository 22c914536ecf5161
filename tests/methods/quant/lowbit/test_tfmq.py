import pytest
import torch
from conftest import (
    assert_deterministic_calibration,
    assert_reload_identical,
    denoiser,
    make_tiny_dit,
    make_tiny_sd,
    sample,
)

import effdiff
from effdiff import RecipeError
from effdiff.adapters import adapter_for
from effdiff.api import is_accelerated
from effdiff.methods.quant.lowbit.fake import TemporalActivation, grid_from_range
from effdiff.methods.quant.lowbit.observe import calibration_prompts, run_pipeline, target_layers
from effdiff.methods.quant.lowbit.tfmq import temporal_features, temporal_layers

STEPS = 4
FAST = "prompts=2,steps=4,iters=0"  # one small calibration call, rounding to nearest
W4A4 = f"tfmq:wbits=4,abits=4,{FAST}"
UNET_TEMPORAL = ["time_embedding.linear_1", "time_embedding.linear_2", "down_blocks.0.resnets.0.time_emb_proj",
                 "down_blocks.1.resnets.0.time_emb_proj", "mid_block.resnets.0.time_emb_proj",
                 "mid_block.resnets.1.time_emb_proj", "up_blocks.0.resnets.0.time_emb_proj",
                 "up_blocks.0.resnets.1.time_emb_proj", "up_blocks.1.resnets.0.time_emb_proj",
                 "up_blocks.1.resnets.1.time_emb_proj"]

pytestmark = pytest.mark.usefixtures("fresh_quant_memo")


def _tables(pipe) -> dict[str, TemporalActivation]:
    """The live per-timestep quantizer of every patched temporal layer."""
    return {name: vars(m)["forward"].activation for name, m in denoiser(pipe).named_modules()
            if "forward" in vars(m) and isinstance(vars(m)["forward"].activation, TemporalActivation)}


def _features(pipe, names: list[str], steps: int = STEPS) -> dict[str, torch.Tensor]:
    """Outputs of the named layers over one sampling run, concatenated over its calls."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    modules = dict(denoiser(pipe).named_modules())
    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: seen[n].append(o.detach())) for n in names]
    try:
        sample(pipe, steps=steps)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-dit"])
def test_finds_the_temporal_block_of_the_bundled_models(model):
    names = list(target_layers(adapter_for(effdiff.load(model))))
    found = temporal_layers(names)
    if model == "tiny-sd":
        projections = [n for n in names if n.endswith(".time_emb_proj")]
        assert found == ["time_embedding.linear_1", "time_embedding.linear_2", *projections]
        assert len(projections) == 11
        assert not any("add_embedding" in n for n in found)  # the pooled-caption path is not temporal
        assert temporal_features(found) == found[1:]
    else:
        emb = "adaln_single.emb.timestep_embedder"
        assert found == [f"{emb}.linear_1", f"{emb}.linear_2", "adaln_single.linear"]
        assert temporal_features(found) == found[1:]


def test_nothing_quantized_is_bit_identical(tiny_pipe):
    baseline = sample(tiny_pipe, steps=STEPS)
    effdiff.accelerate(tiny_pipe, f"tfmq:wbits=32,abits=32,{FAST}")
    method = tiny_pipe.effdiff.methods[0]
    assert method.layers and all(r.act_times is None and r.codes is None for r in method.layers.values())
    assert torch.equal(sample(tiny_pipe, steps=STEPS), baseline)


def test_quantizes_then_remove_restores_bit_for_bit(tiny_pipe):
    baseline = sample(tiny_pipe, steps=STEPS)
    state = {k: v.clone() for k, v in denoiser(tiny_pipe).state_dict().items()}
    effdiff.accelerate(tiny_pipe, W4A4)
    method = tiny_pipe.effdiff.methods[0]
    quantized = sample(tiny_pipe, steps=STEPS)
    assert torch.isfinite(quantized).all() and not torch.equal(quantized, baseline)
    assert (quantized - baseline).abs().mean() < 0.3  # quantized, not broken
    assert set(_tables(tiny_pipe)) == set(method.info["temporal_layers"])  # FSC on exactly the temporal layers
    assert "simulated" in tiny_pipe.effdiff.describe()
    tiny_pipe.effdiff.remove()
    assert not any("forward" in vars(m) for m in denoiser(tiny_pipe).modules())
    assert all(torch.equal(v, state[k]) for k, v in denoiser(tiny_pipe).state_dict().items())
    assert torch.equal(sample(tiny_pipe, steps=STEPS), baseline)


def test_finite_set_grids_are_each_timesteps_minmax(tiny_sd):
    names = [n for n in UNET_TEMPORAL if n in dict(denoiser(tiny_sd).named_modules())]
    ranges: dict[tuple[str, float], tuple[float, float]] = {}
    clock: list[float] = []
    unet = denoiser(tiny_sd)
    modules = dict(unet.named_modules())

    def record(name):
        def hook(module, args):
            key = (name, clock[-1])
            lo, hi = ranges.get(key, (float("inf"), float("-inf")))
            ranges[key] = (min(lo, float(args[0].min())), max(hi, float(args[0].max())))
        return hook

    handles = [modules[n].register_forward_pre_hook(record(n)) for n in names]
    handles.append(unet.register_forward_pre_hook(lambda m, a: clock.append(float(a[1]))))
    run_pipeline(tiny_sd, calibration_prompts(tiny_sd, 2), 0, STEPS)  # what calibration sees
    for h in handles:
        h.remove()
    effdiff.accelerate(tiny_sd, W4A4)
    layers = tiny_sd.effdiff.methods[0].layers
    for name in names:
        record = layers[name]
        times = record.act_times.tolist()
        assert times == sorted(set(clock)) and record.act_scale.shape == (STEPS, 1)
        for i, t in enumerate(times):
            lo, hi = ranges[(name, t)]
            grid = grid_from_range(torch.tensor([lo]), torch.tensor([hi]), 4, symmetric=False)
            assert torch.equal(record.act_scale[i], grid.scale) and torch.equal(record.act_zero[i], grid.zero)
        assert len(set(record.act_scale.flatten().tolist())) > 1  # the grids differ across timesteps


def test_finite_set_grids_cut_the_temporal_quantization_error(tiny_sd):
    """At equal range estimator (min-max), one grid per timestep quantizes the temporal layers' inputs with less
    error than one grid over all timesteps (the comparison of the paper's finite set calibration)."""
    names = UNET_TEMPORAL
    modules = dict(denoiser(tiny_sd).named_modules())
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0].clone())) for n in names]
    run_pipeline(tiny_sd, calibration_prompts(tiny_sd, 2), 0, STEPS)
    for h in handles:
        h.remove()
    effdiff.accelerate(tiny_sd, f"tfmq:wbits=32,abits=4,{FAST}")
    tables, ctx = _tables(tiny_sd), tiny_sd.effdiff.context
    for name in names:
        table, seen = tables[name], inputs[name]
        everything = torch.cat(seen)
        static = grid_from_range(everything.min(), everything.max(), 4, symmetric=False)
        per_t = static_error = 0.0
        for x, t in zip(seen, sorted(table.timesteps, reverse=True), strict=True):  # DDIM runs high t first
            ctx.timestep = t
            per_t += float((table(x) - x).pow(2).sum())
            static_error += float((static.fake(x) - x).pow(2).sum())
        assert per_t <= static_error
    total = {k: 0.0 for k in ("fsc", "static")}
    for name in names[2:]:  # the projections: their inputs drift with the timestep
        table, seen = tables[name], inputs[name]
        static = grid_from_range(torch.cat(seen).min(), torch.cat(seen).max(), 4, symmetric=False)
        for x, t in zip(seen, sorted(table.timesteps, reverse=True), strict=True):
            ctx.timestep = t
            total["fsc"] += float((table(x) - x).pow(2).sum())
            total["static"] += float((static.fake(x) - x).pow(2).sum())
    assert total["fsc"] < 0.9 * total["static"]


def test_tiar_learns_roundings_of_the_temporal_block(tiny_sd):
    effdiff.accelerate(tiny_sd, "tfmq:wbits=4,abits=4,prompts=2,steps=4,iters=30")
    ratios = tiny_sd.effdiff.methods[0].info["tiar_error_ratio"]
    assert list(ratios) == UNET_TEMPORAL
    assert all(r <= 1.0 for r in ratios.values()) and min(ratios.values()) < 0.9
    assert ratios["time_embedding.linear_1"] < 1.0  # learned through the replayed block, not its own output


def test_unseen_timesteps_use_the_nearest_grid(tiny_pipe):
    effdiff.accelerate(tiny_pipe, W4A4)  # calibrated at 4 steps
    runs = [sample(tiny_pipe, steps=7) for _ in range(2)]  # 7 steps: timesteps never calibrated
    assert torch.isfinite(runs[0]).all() and torch.equal(*runs)
    name, act = next(iter(_tables(tiny_pipe).items()))
    ctx = tiny_pipe.effdiff.context
    calibrated = act.timesteps
    x = torch.randn(3, dict(denoiser(tiny_pipe).named_modules())[name].in_features) * 4
    for t in (calibrated[0] - 50.0, (calibrated[0] + calibrated[1]) / 2 - 1, calibrated[-1] + 1.0):
        ctx.timestep = t
        nearest = min(range(len(calibrated)), key=lambda i: abs(calibrated[i] - t))
        assert torch.equal(act(x), act.grids[nearest](x))


def test_save_and_reload_give_identical_outputs(tiny_pipe, tmp_path):
    path = tmp_path / "tfmq.safetensors"
    method, reloaded = assert_reload_identical(tiny_pipe, W4A4, path, STEPS)
    for name in method.info["temporal_layers"]:
        for key in ("act_times", "act_scale", "act_zero", "codes"):
            assert torch.equal(getattr(method.layers[name], key), getattr(reloaded.layers[name], key))
    with pytest.raises(RecipeError, match="calibrated with"):
        effdiff.accelerate(tiny_pipe, f"{W4A4},fsc=mse,calibration={path}")
    with pytest.raises(RecipeError, match="was saved by tfmq"):
        effdiff.accelerate(tiny_pipe, f"qdiffusion:wbits=4,abits=4,{FAST},calibration={path}")


def test_calibration_is_deterministic():
    assert_deterministic_calibration(make_tiny_dit, "tfmq:wbits=4,abits=4,prompts=2,steps=4,iters=10")


@pytest.mark.parametrize(("recipe", "message"), [
    ("tfmq:abits=1", "one of 2, 3, 4"),
    ("tfmq:fsc=percentile", "one of minmax, mse, off"),
    ("tfmq:tiar=maybe", "tiar"),
    ("tfmq:iters=-1", r"in \[0, 20000\]"),
    ("tfmq:fcs=mse", "did you mean 'fsc'"),
    ("tfmq+qdiffusion", "both take over the weights"),
])
def test_bad_settings_refused(recipe, message):
    pipe = make_tiny_sd()
    with pytest.raises(RecipeError, match=message):
        effdiff.accelerate(pipe, recipe)
    assert not is_accelerated(pipe)
