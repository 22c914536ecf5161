import json

import pytest
import torch
from conftest import make_tiny, make_tiny_dit, make_tiny_sd, no_patches, sample

import effdiff
from effdiff import RecipeError
from effdiff.api import is_accelerated
from effdiff.eval.cost import find_denoiser
from effdiff.methods.cache.teacache import TeaCache, calibration_file, rescale
from effdiff.methods.solvers.schedule import model_fingerprint

STEPS = 6
KINDS = ("unet", "dit")


pytestmark = pytest.mark.usefixtures("private_cache")


def _leaf_calls(pipe):
    calls = {"n": 0}
    kinds = (torch.nn.Linear, torch.nn.Conv2d)
    for name, m in find_denoiser(pipe).named_modules():
        if isinstance(m, kinds) and "blocks" in name:
            m.register_forward_pre_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    return calls




@pytest.mark.parametrize("kind", KINDS)
def test_threshold_zero_is_bit_identical(kind):
    pipe = make_tiny(kind)
    baseline = sample(pipe, steps=STEPS)
    effdiff.accelerate(pipe, "teacache:threshold=0")
    assert torch.equal(sample(pipe, steps=STEPS), baseline)
    method = pipe.effdiff.methods[0]
    assert method.stats.cached == 0 and method.stats.full == STEPS
    assert len(method.changes) == STEPS and all(c > 0 for c in method.changes[1:])


@pytest.mark.parametrize("kind", KINDS)
def test_positive_threshold_skips_repeats_and_restores(kind):
    pipe = make_tiny(kind)
    calls = _leaf_calls(pipe)
    baseline = sample(pipe, steps=STEPS)
    full = calls["n"]
    effdiff.accelerate(pipe, "teacache:threshold=1")
    calls["n"] = 0
    first = sample(pipe, steps=STEPS)
    method = pipe.effdiff.methods[0]
    assert calls["n"] < full, "no block compute was skipped"
    assert method.stats.cached > 0 and method.stats.calls == STEPS
    assert first.shape == baseline.shape and torch.isfinite(first).all() and not torch.equal(first, baseline)
    assert torch.equal(sample(pipe, steps=STEPS), first)  # state is reset per call
    assert method.stats.calls == STEPS
    pipe.effdiff.remove()
    assert no_patches(pipe)
    assert torch.equal(sample(pipe, steps=STEPS), baseline)


@pytest.mark.parametrize("kind", KINDS)
def test_accumulator_first_warmup_and_last_steps_always_run(kind):
    pipe = make_tiny(kind)
    effdiff.accelerate(pipe, "teacache:threshold=100,warmup=2")
    sample(pipe, steps=STEPS)
    # steps 0, 1 (warmup) and 5 (last) run; the huge threshold lets 2, 3, 4 be served from cache
    assert (pipe.effdiff.methods[0].stats.full, pipe.effdiff.methods[0].stats.cached) == (3, 3)


def test_rescaling_polynomial_steers_skipping(tiny_dit):
    effdiff.accelerate(tiny_dit, "teacache:threshold=1,coefficients=2")  # constant 2 >= 1: never skip
    baseline_like = tiny_dit.effdiff.methods[0]
    sample(tiny_dit, steps=STEPS)
    assert baseline_like.stats.cached == 0
    tiny_dit.effdiff.remove()
    effdiff.accelerate(tiny_dit, "teacache:threshold=1,coefficients=0.1")  # 0.1 a step: skip all but 1st, last
    sample(tiny_dit, steps=STEPS)
    assert tiny_dit.effdiff.methods[0].stats.cached == STEPS - 2
    assert rescale([1.0, 2.0, 3.0], 2.0) == 1 + 4 + 12
    assert TeaCache(coefficients="1, 2;3|4").coefficients == [1.0, 2.0, 3.0, 4.0]


def test_separate_cfg_calls_keep_separate_accumulators():
    pipe = make_tiny_sd()
    inner = type(pipe)._call_denoiser

    def two_calls(x, t, text):
        halves = [inner(pipe, xi, t, ti) for xi, ti in zip(x.chunk(2), text.chunk(2), strict=True)]
        return torch.cat(halves)

    pipe._call_denoiser = two_calls
    effdiff.accelerate(pipe, "teacache:threshold=1")
    out = sample(pipe, steps=STEPS)
    branch = pipe.effdiff.context.state(pipe.effdiff.methods[0])
    assert ("slot", 1) in branch and "modulated" in branch[("slot", 1)]
    assert torch.isfinite(out).all() and pipe.effdiff.methods[0].stats.calls == 2 * STEPS


@pytest.mark.parametrize("kind", KINDS)
def test_saved_calibration_is_picked_up(kind, tmp_path):
    pipe = make_tiny(kind)
    pipe.effdiff_model_name = f"tiny-{kind}"
    record = {"coefficients": [0.0, 0.5], "threshold": 2.0, "target": "psnr>=30",
              "fingerprint": model_fingerprint(find_denoiser(pipe))}
    path = calibration_file(pipe.effdiff_model_name)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record))
    effdiff.accelerate(pipe, "teacache")
    method = pipe.effdiff.methods[0]
    assert (method.coefficients, method.threshold, method.source) == ([0.0, 0.5], 2.0, str(path))
    pipe.effdiff.remove()
    effdiff.accelerate(pipe, "teacache:threshold=0.3")  # explicit values win over the file
    assert pipe.effdiff.methods[0].threshold == 0.3 and pipe.effdiff.methods[0].coefficients == [0.0, 0.5]
    pipe.effdiff.remove()
    effdiff.accelerate(pipe, "teacache:calibration=none")
    assert pipe.effdiff.methods[0].coefficients == [0.0, 1.0] and pipe.effdiff.methods[0].threshold == 0.1
    pipe.effdiff.remove()
    record["fingerprint"] = "someone-else"
    path.write_text(json.dumps(record))
    with pytest.warns(UserWarning, match="other weights"):
        effdiff.accelerate(pipe, "teacache")
    assert pipe.effdiff.methods[0].source == "parameters"
    pipe.effdiff.remove()
    explicit = tmp_path / "mine.json"
    explicit.write_text(json.dumps({**record, "fingerprint": model_fingerprint(find_denoiser(pipe))}))
    effdiff.accelerate(pipe, f"teacache:calibration={explicit}")
    assert pipe.effdiff.methods[0].threshold == 2.0


@pytest.mark.parametrize(("recipe", "message"), [
    ("teacache:threshold=-1", "threshold"),
    ("teacache:warmup=-1", "warmup"),
    ("teacache:coefficients=a|b", "comma-separated numbers"),
    ("teacache:coefficients=0,1", "expected key=value"),
    ("teacache:coefficients=1|nan", "finite"),
    ("teacache:calibration=/nonexistent/teacache.json", "not found"),
    ("teacache:treshold=0.1", "did you mean 'threshold'"),
    ("teacache+fbcache", "cannot be stacked"),
])
def test_bad_settings_are_refused(recipe, message, tmp_path):
    pipe = make_tiny_dit()
    baseline = sample(pipe, steps=2)
    with pytest.raises(RecipeError, match=message):
        effdiff.accelerate(pipe, recipe)
    assert not is_accelerated(pipe) and no_patches(pipe)
    assert torch.equal(sample(pipe, steps=2), baseline)


def test_malformed_calibration_file_is_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(RecipeError, match="not a TeaCache calibration"):
        effdiff.accelerate(make_tiny_dit(), f"teacache:calibration={bad}")


def test_registry_declaration():
    cls = effdiff.get_method("teacache")
    assert cls is TeaCache and cls.family == "cache" and cls.paper.arxiv == "2411.19108"
    assert "arXiv 2411.19108" in cls.__doc__


def test_describe_says_when_the_model_is_uncalibrated():
    pipe = make_tiny_dit()
    effdiff.accelerate(pipe, "teacache:calibration=none")
    assert "uncalibrated for this model" in pipe.effdiff.describe()
    pipe.effdiff.remove()
    effdiff.accelerate(pipe, "teacache:coefficients=0|2,calibration=none")
    assert "uncalibrated" not in pipe.effdiff.describe()


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-dit"])
def test_a_bundled_model_uses_its_shipped_calibration(model):
    pipe = effdiff.load(model)
    shipped = pipe.effdiff_calibration("teacache")
    assert shipped is not None and shipped["fingerprint"] == model_fingerprint(find_denoiser(pipe))
    effdiff.accelerate(pipe, "teacache")
    method = pipe.effdiff.methods[0]
    assert method.coefficients == shipped["coefficients"] and method.threshold == shipped["threshold"]
    assert method.source == f"the calibration shipped with {model}" and method.calibrated
    assert "uncalibrated" not in pipe.effdiff.describe()


def test_a_shipped_calibration_for_other_weights_is_not_used():
    pipe = make_tiny_dit()  # random weights under a bundled model's name: the shipped record's fingerprint differs
    pipe.effdiff_model_name = "tiny-dit"
    assert pipe.effdiff_calibration("teacache") is not None
    effdiff.accelerate(pipe, "teacache")
    assert pipe.effdiff.methods[0].source == "parameters"
    assert "uncalibrated for this model" in pipe.effdiff.describe()
