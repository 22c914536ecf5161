import pytest
import torch
from conftest import denoiser, make_tiny_dit, sample
from torch import nn

import effdiff
from effdiff import RecipeError
from effdiff.api import is_accelerated
from effdiff.context import StepContext
from effdiff.methods.quant.lowbit.base import forget_calibrations
from effdiff.methods.quant.lowbit.fake import Observer, TemporalActivation
from effdiff.methods.quant.lowbit.observe import calibration_prompts, run_pipeline
from effdiff.methods.quant.lowbit.packed import unpack
from effdiff.methods.quant.lowbit.ptq import naive_layer
from effdiff.methods.quant.lowbit.qat import QALoRALayer
from effdiff.recording import Trajectory

STEPS = 4
FAST = "prompts=2,steps=4,batch=2"


pytestmark = pytest.mark.usefixtures("fresh_quant_memo")


def test_nothing_quantized_is_bit_identical_and_trains_nothing(tiny_pipe):
    baseline = sample(tiny_pipe, steps=STEPS)
    effdiff.accelerate(tiny_pipe, f"efficientdm:wbits=32,abits=32,iters=50,{FAST}")
    method = tiny_pipe.effdiff.methods[0]
    assert method.layers and method.info["iters"] == 0 and "talsq" not in method.info
    assert torch.equal(sample(tiny_pipe, steps=STEPS), baseline)


def test_distillation_lowers_the_loss_deterministically():
    runs = []
    for _ in range(2):
        forget_calibrations()
        pipe = make_tiny_dit()
        effdiff.accelerate(pipe, f"efficientdm:wbits=4,abits=4,iters=30,{FAST}")
        runs.append((pipe.effdiff.methods[0], sample(pipe, steps=STEPS)))
    (first, out1), (second, out2) = runs
    assert first.info["distill_loss_trained"] < 0.9 * first.info["distill_loss_ptq"]
    assert first.info["talsq"] == second.info["talsq"] and torch.equal(out1, out2)
    for name, record in first.layers.items():
        for key, tensor in record.tensors().items():
            assert torch.equal(tensor, second.layers[name].tensors()[key]), (name, key)
    steps = first.info["talsq"]["steps"]
    assert len(first.info["talsq"]["timesteps"]) == STEPS
    assert any(rows[0] != rows[-1] for rows in steps.values())  # per-timestep steps actually learned apart


@pytest.mark.parametrize("conv", [False, True])
def test_merged_record_reproduces_the_trained_layer_exactly(conv):
    torch.manual_seed(0)
    module = nn.Conv2d(6, 5, 3, padding=1) if conv else nn.Linear(12, 7)
    x = torch.randn(4, 6, 5, 5) if conv else torch.randn(4, 3, 12)
    observer = Observer(conv=conv, keep_values=True)
    observer.update(x)
    init = naive_layer(module, observer, 4, 4, "mse", 100.0)
    layer = QALoRALayer(module, init, rank=2, rows=3, generator=torch.Generator().manual_seed(0))
    target = module(x).detach() + 0.1
    optimizer = torch.optim.Adam(layer.lora + layer.scales, lr=0.05)
    for step in range(6):
        layer.row = step % 3
        loss = (layer(x) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert layer.b.abs().sum() > 0 and layer.v.abs().sum() > 0 and layer.u.abs().sum() > 0
    with torch.no_grad():
        for row in range(3):
            layer.row = row
            record = layer.record(row)
            assert torch.equal(record.layer(module)(x), layer(x))
            assert torch.equal(record.weight(module.weight), layer.weight())  # the fake-quant W + s0 B A
            codes = unpack(record.codes, 4, 0, module.weight.numel())
            assert codes.min() >= 0 and codes.max() <= 15 and torch.equal(codes, codes.round())
        assert not torch.equal(layer.record(0).weight(module.weight), init.weight(module.weight))  # LoRA merged


@pytest.mark.parametrize("talsq", [True, False])
def test_deployed_model_reproduces_the_trained_forward_exactly(tiny_pipe, talsq):
    conditions = calibration_prompts(tiny_pipe, 2)
    with Trajectory(denoiser(tiny_pipe)) as trajectory:  # the same float run the calibration records
        run_pipeline(tiny_pipe, conditions, 0, STEPS)
    effdiff.accelerate(tiny_pipe, f"efficientdm:wbits=4,abits=4,iters=5,talsq={str(talsq).lower()},{FAST}")
    method = tiny_pipe.effdiff.methods[0]
    with torch.no_grad():
        losses = [float(nn.functional.mse_loss(denoiser(tiny_pipe)(*c.args, **c.kwargs)[0], c.target))
                  for c in trajectory.calls]
    assert sum(losses) / len(losses) == method.info["distill_loss_trained"]
    assert ("talsq" in method.info) == talsq


def test_nearest_calibration_timestep_picks_the_grid():
    ctx = StepContext()
    picked = []
    grids = [lambda x, i=i: picked.append(i) or x for i in range(3)]
    act = TemporalActivation(ctx, [999.0, 500.0, 1.0], grids, lambda x: picked.append("fallback") or x)
    for t in (None, 1000.0, 760.0, 740.0, 300.0, 0.0):
        ctx.timestep = t
        act(torch.zeros(1))
    assert picked == ["fallback", 0, 0, 1, 1, 2]


def test_save_reload_identical_and_size_counts_the_table(tiny_sd, tmp_path):
    path = tmp_path / "edm.safetensors"
    recipe = f"efficientdm:wbits=4,abits=4,iters=5,{FAST}"
    effdiff.accelerate(tiny_sd, recipe)
    method = tiny_sd.effdiff.methods[0]
    quantized = sample(tiny_sd, steps=STEPS)
    size = method.size()
    table = sum(len(r) for rows in method.info["talsq"]["steps"].values() for r in rows)
    assert size["records_bytes"] == sum(lq.nbytes() for lq in method.layers.values()) + 4 * table
    assert size["bytes"] < 0.5 * size["fp32_bytes"]
    method.save(str(path))
    tiny_sd.effdiff.remove()
    forget_calibrations()
    effdiff.accelerate(tiny_sd, f"{recipe},calibration={path}")
    assert torch.equal(sample(tiny_sd, steps=STEPS), quantized)
    tiny_sd.effdiff.remove()
    with pytest.raises(RecipeError, match="calibrated with"):
        effdiff.accelerate(tiny_sd, f"efficientdm:wbits=4,abits=4,iters=6,{FAST},calibration={path}")


def test_remove_restores_bit_for_bit(tiny_pipe):
    baseline = sample(tiny_pipe, steps=STEPS)
    model = denoiser(tiny_pipe)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    effdiff.accelerate(tiny_pipe, f"dpmpp2m:steps=4+efficientdm:wbits=4,abits=8,iters=5,{FAST}")
    out = sample(tiny_pipe, steps=STEPS)
    assert torch.isfinite(out).all() and not torch.equal(out, baseline)
    assert "simulated" in tiny_pipe.effdiff.describe()
    tiny_pipe.effdiff.remove()
    assert not any("forward" in vars(m) for m in model.modules())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(sample(tiny_pipe, steps=STEPS), baseline)


@pytest.mark.parametrize(("recipe", "message"), [
    ("efficientdm:rank=0", "rank"),
    ("efficientdm:iters=-1", "iters"),
    ("efficientdm:range=percentile", "one of minmax, mse"),
    ("efficientdm:wbits=9", "one of 2, 3, 4"),
    ("efficientdm:lr=-0.1", "lr"),
    ("efficientdm:talsq=maybe", "true or false"),
    ("ptq+efficientdm", "both take over the weights"),
])
def test_bad_settings_refused(tiny_sd, recipe, message):
    with pytest.raises(RecipeError, match=message):
        effdiff.accelerate(tiny_sd, recipe)
    assert not is_accelerated(tiny_sd)
