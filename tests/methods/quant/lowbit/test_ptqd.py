import pytest
import torch
from conftest import denoiser, make_tiny_dit, make_tiny_sd, sample
from diffusers import DDIMScheduler, DDPMScheduler

import effdiff
from effdiff import RecipeError
from effdiff.api import is_accelerated
from effdiff.methods.quant.lowbit import ptq, ptqd
from effdiff.methods.quant.lowbit.base import forget_calibrations
from effdiff.methods.quant.lowbit.packed import LayerQuant

STEPS = 4
FAST = "prompts=2,steps=4"


pytestmark = pytest.mark.usefixtures("fresh_quant_memo")


def _untouched(pipe):
    modules_clean = not any("forward" in vars(m) for m in denoiser(pipe).modules())
    return modules_clean and not {"step", "_get_variance"} & set(vars(pipe.scheduler))


class AffineOutput(LayerQuant):
    """A "quantized" output layer whose error is exactly ``k * out + b``: what PTQD's model assumes."""

    k, b = 0.25, 0.05

    def layer(self, module, *_):
        return lambda x: (1 + self.k) * module._conv_forward(x, module.weight, module.bias) + self.b


def test_fit_recovers_slope_and_per_channel_bias():
    gen = torch.Generator().manual_seed(0)
    fp = torch.randn(4, 3, 64, generator=gen)
    bias = torch.tensor([0.1, -0.2, 0.3])
    noise = 0.01 * torch.randn(4, 3, 64, generator=gen)
    q = 1.3 * fp + bias[None, :, None] + noise
    fitted = ptqd.fit_correction({500.0: [(fp, q, True)]}, 3, "epsilon")
    assert fitted.k[0] == pytest.approx(0.3, abs=2e-3)
    assert torch.allclose(torch.tensor(fitted.mu[0]), bias, atol=2e-3)
    corrected = fitted.apply(q.reshape(4, 3, 8, 8), 500.0).reshape(4, 3, 64)
    assert (corrected - fp).pow(2).mean() < 1e-3 * fp.pow(2).mean()
    uu, cc, uc = fitted.moments[0]  # the residual is the injected noise / 1.3, independent across halves
    assert uu == pytest.approx(1e-4 / 1.69, rel=0.2) and abs(uc) < 0.2 * uu


def test_unseen_timesteps_interpolate_and_learned_sigma_passes_through():
    c = ptqd.Correction([100.0, 300.0], [0.0, 0.2], [[0.0], [0.4]], [[1.0] * 3, [3.0] * 3], 1, "epsilon")
    assert c.k_at(200.0) == pytest.approx(0.1) and c.k_at(50.0) == 0.0 and c.k_at(900.0) == 0.2
    assert float(c.mu_at(250.0)) == pytest.approx(0.3)
    assert c.residual_variance(200.0, None) == pytest.approx(2.0)
    out = torch.ones(2, 2, 4, 4)  # channel 0: prediction, channel 1: learned sigma
    fixed = c.apply(out, 300.0)
    assert torch.allclose(fixed[:, 0], torch.full((2, 4, 4), 0.6 / 1.2)) and torch.equal(fixed[:, 1], out[:, 1])


def test_cfg_guided_variance_uses_the_halves_covariance():
    c = ptqd.Correction([1.0], [0.0], [[0.0]], [[1.0, 2.0, 0.5]], 1, "epsilon")
    w = 4.0
    assert c.residual_variance(1.0, w) == pytest.approx((1 - w) ** 2 * 1.0 + w**2 * 2.0 + 2 * w * (1 - w) * 0.5)
    assert c.residual_variance(1.0, 1.0) == 2.0


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_full_precision_is_bit_identical_with_zero_correction(kind):
    pipe = make_tiny_sd() if kind == "unet" else make_tiny_dit()
    baseline = sample(pipe, steps=STEPS)
    effdiff.accelerate(pipe, f"ptqd:wbits=32,abits=32,base=ptq,{FAST}")
    method = pipe.effdiff.methods[0]
    c = method.correction
    assert len(c.timesteps) == STEPS and all(k == 0.0 for k in c.k)
    assert all(m == 0.0 for row in c.mu for m in row) and all(v == 0.0 for row in c.moments for v in row)
    assert torch.equal(sample(pipe, steps=STEPS), baseline)


def test_synthetic_affine_error_is_fitted_and_removed(tiny_sd, monkeypatch):
    baseline = sample(tiny_sd, steps=STEPS)
    conv_out = tiny_sd.unet.conv_out

    def affine_base(self, pipe):
        return {"conv_out": AffineOutput(list(conv_out.weight.shape), 8)}

    monkeypatch.setattr(ptq.PTQ, "calibrate", affine_base)
    monkeypatch.setattr(ptq.PTQ, "calibration_notes", lambda self: {})
    effdiff.accelerate(tiny_sd, f"ptqd:base=ptq,variance=false,{FAST}")
    c = tiny_sd.effdiff.methods[0].correction
    assert c.prediction_type == "epsilon" and len(c.timesteps) == STEPS
    assert all(k == pytest.approx(AffineOutput.k, abs=1e-5) for k in c.k)
    assert all(m[0] == pytest.approx(AffineOutput.b, abs=1e-5) for m in c.mu)
    assert max(max(row) for row in c.moments) < 1e-10
    corrected = sample(tiny_sd, steps=STEPS)
    assert torch.allclose(corrected, baseline, atol=1e-4)
    # without the correction the same layer is far off: the fit is what closes the gap
    tiny_sd.effdiff.methods[0].correction = ptqd.Correction(c.timesteps, [0.0] * STEPS, [[0.0]] * STEPS,
                                                            c.moments, 1, c.prediction_type)
    assert (sample(tiny_sd, steps=STEPS) - baseline).abs().max() > 100 * (corrected - baseline).abs().max()


def test_corrects_a_real_quantizer_and_remove_restores_bit_for_bit(tiny_pipe):
    baseline = sample(tiny_pipe, steps=STEPS)
    state = {k: v.clone() for k, v in denoiser(tiny_pipe).state_dict().items()}
    effdiff.accelerate(tiny_pipe, f"ptq:wbits=4,abits=4,{FAST}")
    base_only = sample(tiny_pipe, steps=STEPS)
    tiny_pipe.effdiff.remove()
    effdiff.accelerate(tiny_pipe, f"ptqd:wbits=4,abits=4,base=ptq,{FAST}")
    method = tiny_pipe.effdiff.methods[0]
    corrected = sample(tiny_pipe, steps=STEPS)
    assert torch.isfinite(corrected).all() and not torch.equal(corrected, base_only)
    assert any(k != 0.0 for k in method.correction.k)
    described = tiny_pipe.effdiff.describe()
    assert "PTQD on ptq" in described and "simulated" in described and "DDIM with eta=0" in described
    tiny_pipe.effdiff.remove()
    assert _untouched(tiny_pipe)
    assert all(torch.equal(v, state[k]) for k, v in denoiser(tiny_pipe).state_dict().items())
    assert torch.equal(sample(tiny_pipe, steps=STEPS), baseline)


def test_save_and_reload_give_identical_outputs(tiny_sd, tmp_path):
    path = tmp_path / "ptqd.safetensors"
    effdiff.accelerate(tiny_sd, f"ptqd:wbits=4,abits=8,base=ptq,{FAST}")
    method = tiny_sd.effdiff.methods[0]
    quantized = sample(tiny_sd, steps=STEPS)
    method.save(str(path))
    fitted = method.correction
    tiny_sd.effdiff.remove()
    forget_calibrations()
    effdiff.accelerate(tiny_sd, f"ptqd:wbits=4,abits=8,base=ptq,variance=false,{FAST},calibration={path}")
    assert tiny_sd.effdiff.methods[0].correction == fitted
    assert torch.equal(sample(tiny_sd, steps=STEPS), quantized)  # DDIM eta=0: variance on or off is the same
    tiny_sd.effdiff.remove()
    with pytest.raises(RecipeError, match="calibrated with"):
        effdiff.accelerate(tiny_sd, f"ptqd:wbits=4,abits=8,base=qdiffusion,{FAST},calibration={path}")
    effdiff.accelerate(tiny_sd, f"ptq:wbits=4,abits=8,{FAST}")
    tiny_sd.effdiff.methods[0].save(str(tmp_path / "ptq.safetensors"))
    tiny_sd.effdiff.remove()
    with pytest.raises(RecipeError, match="was saved by ptq"):
        effdiff.accelerate(tiny_sd, f"ptqd:wbits=4,abits=8,{FAST},calibration={tmp_path / 'ptq.safetensors'}")


def _variance_runs(pipe, scheduler):
    pipe.scheduler = scheduler
    outs, methods = [], []
    for variance in ("true", "false"):
        effdiff.accelerate(pipe, f"ptqd:wbits=4,abits=4,base=ptq,variance={variance},{FAST}")
        outs.append(sample(pipe, steps=STEPS))
        methods.append((pipe.effdiff.methods[0], pipe.effdiff.describe()))
        pipe.effdiff.remove()
        assert _untouched(pipe)
    return outs, methods


def test_variance_calibration_reduces_ddpm_noise_only(tiny_sd):
    (on, off), [(method, described), _] = _variance_runs(
        tiny_sd, DDPMScheduler.from_config(tiny_sd.scheduler.config))
    assert not torch.equal(on, off)
    assert len(method.absorbed) == STEPS - 1  # the last DDPM step injects no noise
    assert all(after < before for _, before, after in method.absorbed)
    assert "absorbed into DDPMScheduler's noise" in described
    ddim = DDIMScheduler.from_config(tiny_sd.scheduler.config)
    (on, off), [(method, described), _] = _variance_runs(tiny_sd, ddim)
    assert torch.equal(on, off) and method.absorbed == []
    assert "inapplicable: DDIM with eta=0 is deterministic" in described


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_step_coefficient_matches_the_scheduler(kind, prediction_type):
    """``c`` (how far x_prev moves per unit of model output) against a finite difference of the real step."""
    cls = DDPMScheduler if kind == "ddpm" else DDIMScheduler
    scheduler = cls(prediction_type=prediction_type, clip_sample=False)
    scheduler.set_timesteps(10)
    t = int(scheduler.timesteps[3])
    gen = torch.Generator().manual_seed(0)
    x, out, delta = (torch.randn(1, 1, 4, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    extra = {} if kind == "ddpm" else {"eta": 0.7, "variance_noise": torch.zeros_like(x)}

    def prev(model_output):
        generator = torch.Generator().manual_seed(1) if kind == "ddpm" else None
        return scheduler.step(model_output, t, x, generator=generator, **extra).prev_sample

    c, v = ptqd.step_noise(scheduler, t, 0.7)
    assert torch.allclose(prev(out + 1e-3 * delta) - prev(out), c * 1e-3 * delta, rtol=1e-6, atol=1e-12)
    expected = scheduler._get_variance(t) if kind == "ddpm" else 0.49 * scheduler._get_variance(t, t - 100)
    assert v == pytest.approx(float(expected))


def test_ddim_with_eta_scales_only_its_injected_noise(tiny_sd):
    tiny_sd.scheduler = DDIMScheduler.from_config(tiny_sd.scheduler.config)
    effdiff.accelerate(tiny_sd, f"ptqd:wbits=4,abits=4,base=ptq,{FAST}")
    method = tiny_sd.effdiff.methods[0]
    sample(tiny_sd, steps=STEPS)  # installs the step wrapper
    scheduler = tiny_sd.scheduler
    gen = torch.Generator().manual_seed(0)
    x, out = torch.randn(1, 1, 8, 8, generator=gen), torch.randn(1, 1, 8, 8, generator=gen)
    t = int(scheduler.timesteps[1])
    wrapped = scheduler.step(out, t, x, eta=0.5, generator=torch.Generator().manual_seed(3)).prev_sample
    silent = type(scheduler).step(scheduler, out, t, x, eta=0.5, variance_noise=torch.zeros_like(x)).prev_sample
    plain = type(scheduler).step(scheduler, out, t, x, eta=0.5, generator=torch.Generator().manual_seed(3))
    (_, before, after), = method.absorbed[-1:]
    assert 0 <= after < before
    ratio = ((wrapped - silent).norm() / (plain.prev_sample - silent).norm()) ** 2
    assert float(ratio) == pytest.approx(after / before, rel=1e-4)


@pytest.mark.parametrize(("recipe", "message"), [
    ("ptqd:base=svdquant", "one of ptq, qdiffusion"),
    ("ptqd:wbits=9", "one of 2, 3, 4"),
    ("ptqd:variance=maybe", "true or false"),
    ("ptqd+qdiffusion", "both take over the weights"),
])
def test_bad_settings_refused(tiny_sd, recipe, message):
    with pytest.raises(RecipeError, match=message):
        effdiff.accelerate(tiny_sd, recipe)
    assert not is_accelerated(tiny_sd)
