import pytest
import torch
from _fixtures import FakeAccelerate, one_thread, tiny_pipeline

from effdiff.api import is_accelerated
from effdiff.bench.runner import image_dir, make_config, run_bench
from effdiff.bench.store import ResultsStore

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


def _run(out, accelerate, run_id=None, models=("m",), loader=tiny_pipeline, on_start=None):
    return run_bench(list(models), ["scale:0.5", "scale:0.9"], samples=4, steps=2, out_dir=out,
                     resume_run_id=run_id, loader=loader, accelerate_fn=accelerate, timing_batch=2,
                     progress=False, on_start=on_start)


def test_end_to_end_rows_and_resume_after_interruption(tmp_path):
    broken = FakeAccelerate(fail_on={"scale:0.9"})
    with ResultsStore(tmp_path / "results.sqlite") as store:
        store.start_run({"placeholder": True})  # an unrelated older run must not interfere
    started = []
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, broken, on_start=started.append)
    run_id = started[0]
    with ResultsStore(tmp_path / "results.sqlite") as store:
        rows = store.rows(run_id)
        assert {s["run_id"]: s["state"] for s in store.summaries()}[run_id] == "interrupted"
    assert [r["recipe"] for r in rows] == ["", "scale:0.5"]
    base, half = (r["metrics"] for r in rows)
    assert base["nfe"] == 2 and half["nfe"] == 2  # 2 steps, CFG batched into one call per step
    assert base["speedup"] == 1.0 and base["psnr"] == 100.0 and base["ssim"] == pytest.approx(1.0)
    assert half["psnr"] < 60 and half["timing_mode"] == "alternating" and "simulated" in half["labels"]
    assert len(half["times_s"]) == 3 and half["time_per_image_s"] > 0 and half["speedup"] > 0
    assert half["flops_per_image"] > half["attention_flops_per_image"] > 0
    assert half["denoiser_flops_per_image"] > 0
    assert half["denoiser_flops_per_image_samples"] == pytest.approx(half["denoiser_flops_per_image"])
    assert "cost≠quality" not in half["labels"] and "cost≠quality" not in base["labels"]
    assert len(half["speedup_reps"]) == 3 and half["prompt_accuracy_ci"][0] <= half["prompt_accuracy"]
    assert "fid_vs_baseline" not in base and "kid_e3" in base  # no pairing with itself
    assert half["fid_vs_baseline"] in ("tie", "higher", "lower") and half["fid_delta_ci"][0] <= half["fid_delta_ci"][1]
    for key in ("fid", "fid_floor", "kid", "prompt_accuracy", "gflops_achieved"):
        assert half[key] is not None
    assert not is_accelerated(tiny_pipeline())

    working = FakeAccelerate()
    assert _run(tmp_path, working, run_id=run_id) == run_id
    assert "scale:0.5" not in working.calls  # finished recipe skipped, not recomputed
    with ResultsStore(tmp_path / "results.sqlite") as store:
        after = store.rows(run_id)
        assert {s["run_id"]: s["state"] for s in store.summaries()}[run_id] == "complete"
    assert [r["recipe"] for r in after] == ["", "scale:0.5", "scale:0.9"]
    assert [r["id"] for r in after[:2]] == [r["id"] for r in rows]
    assert (image_dir(tmp_path, run_id, "m") / "scale_0.9.png").exists()


def test_a_run_that_fails_before_any_row_leaves_no_run(tmp_path):
    def broken_loader(name):
        raise RuntimeError("the model could not be read")

    with pytest.raises(RuntimeError):
        _run(tmp_path, FakeAccelerate(), loader=broken_loader)
    with ResultsStore(tmp_path / "results.sqlite") as store:
        assert store.runs() == [] and store.latest_run() is None


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "--steps must be"), ({"steps": 1001}, "--steps must be"), ({"guidance": float("nan")}, "--guidance"),
    ({"guidance": float("inf")}, "--guidance"), ({"timing_batch": 0}, "--timing-batch"), ({"samples": 1}, "--samples"),
    ({"models": []}, "no model"),
])
def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, kwargs, message):
    args = {"models": ["m"], "recipes": ["scale:0.5"], "samples": 4, "steps": 2, "timing_batch": 2, **kwargs}
    models = args.pop("models")
    with pytest.raises(ValueError, match=message):
        run_bench(models, out_dir=tmp_path / "out", loader=tiny_pipeline, accelerate_fn=FakeAccelerate(),
                  progress=False, **args)
    assert not (tmp_path / "out").exists()


def test_an_unknown_model_is_refused_before_a_run_is_registered(tmp_path):
    from effdiff.zoo import ModelNotFoundError

    with pytest.raises(ModelNotFoundError):
        run_bench(["no-such-model"], [], samples=2, steps=2, out_dir=tmp_path, progress=False)
    assert not (tmp_path / "results.sqlite").exists()


def test_quick_scales_solver_steps_with_the_baseline():
    config = make_config(["m"], ["dpmpp2m:steps=20", "unipc:steps=10+deepcache:interval=3", "deepcache"],
                         samples=100, steps=50, guidance=4.0, seeds=None, quick=True)
    assert config.steps == 10
    assert config.recipes == ("", "dpmpp2m:steps=4", "unipc:steps=2+deepcache:interval=3", "deepcache")


def test_rows_whose_timed_and_sampled_work_differ_are_labelled():
    from effdiff.bench.runner import _noise_labels, _work_check

    same = {"denoiser_flops_per_image": 100.0, "labels": []}
    _work_check(same, 101.0)
    assert same["labels"] == [] and same["work_mismatch"] == pytest.approx(1 / 101)
    skipped_only_when_timed = {"denoiser_flops_per_image": 60.0, "labels": ["x"]}
    _work_check(skipped_only_when_timed, 100.0)
    assert skipped_only_when_timed["labels"] == ["cost≠quality", "x"]
    assert "0.000 GFLOP" in skipped_only_when_timed["cost_quality_note"]
    assert _noise_labels(0.1, 0.1) == [] and _noise_labels(0.3, None) == ["noisy"]
    assert _noise_labels(0.0, 1.2) == ["loaded"]


def test_speed_only_models_get_cost_only(tmp_path):
    run_id = _run(tmp_path, FakeAccelerate(), loader=lambda name: tiny_pipeline(name, speed_only=True))
    with ResultsStore(tmp_path / "results.sqlite") as store:
        rows = store.rows(run_id)
    assert len(rows) == 3 and all(r["metric_set"] == "speed-only" for r in rows)
    for row in rows:
        assert "speed-only" in row["metrics"]["labels"]
        assert "fid" not in row["metrics"] and "psnr" not in row["metrics"]
        assert row["metrics"]["macs_per_image"] > 0


def test_config_normalisation():
    config = make_config(["m"], ["a", "", "a"], samples=100, steps=50, guidance=4.0, seeds=None, quick=True)
    assert config.recipes == ("", "a") and config.steps == 10 and config.samples == 10 and config.reps == 3
    with pytest.raises(ValueError, match="one seed per sample"):
        make_config(["m"], [], samples=4, steps=2, guidance=4.0, seeds=[1, 2], quick=False)


def test_refused_recipe_is_recorded_and_the_run_goes_on(tmp_path):
    from effdiff.api import accelerate

    run_id = run_bench(["m"], ["deltadit", "ddim:steps=3"], samples=2, steps=2, out_dir=tmp_path,
                       loader=tiny_pipeline, accelerate_fn=accelerate, timing_batch=2, progress=False)
    with ResultsStore(tmp_path / "results.sqlite") as store:
        rows = {r["recipe"]: r for r in store.rows(run_id)}
    refused = rows["deltadit"]
    assert refused["metric_set"] == "refused" and "unet" in refused["metrics"]["refused"]
    assert rows["ddim:steps=3"]["metrics"]["nfe"] == 3  # the recipe's steps, not the baseline's 2


def test_until_ends_the_run_after_the_row_it_accepts(tmp_path):
    heard = []

    def enough(model, recipe, metrics):
        heard.append((model, recipe, "psnr" in metrics))
        return recipe == "scale:0.5"

    run_id = run_bench(["m"], ["scale:0.5", "scale:0.9"], samples=2, steps=2, out_dir=tmp_path, loader=tiny_pipeline,
                       accelerate_fn=FakeAccelerate(), timing_batch=2, progress=False, until=enough)
    with ResultsStore(tmp_path / "results.sqlite") as store:
        assert [r["recipe"] for r in store.rows(run_id)] == ["", "scale:0.5"]  # scale:0.9 never generated
        assert next(r for r in store.summaries() if r["run_id"] == run_id)["state"] == "complete"
    assert heard == [("m", "", True), ("m", "scale:0.5", True)]
    heard.clear()  # resumed: the stored rows are heard again, baseline first, and the accepted one ends it
    assert run_bench(["m"], ["scale:0.5", "scale:0.9"], samples=2, steps=2, out_dir=tmp_path, loader=tiny_pipeline,
                     accelerate_fn=FakeAccelerate(), timing_batch=2, progress=False, until=enough,
                     resume_run_id=run_id) == run_id
    assert heard == [("m", "", True), ("m", "scale:0.5", True)]
    with ResultsStore(tmp_path / "results.sqlite") as store:
        assert [r["recipe"] for r in store.rows(run_id)] == ["", "scale:0.5"]  # still nothing more computed


def test_a_refusal_inside_the_call_leaves_the_pipeline_clean_for_the_next_recipe(tmp_path):
    run_id = _run(tmp_path, FakeAccelerate(refuse_in_call={"scale:0.5"}))
    with ResultsStore(tmp_path / "results.sqlite") as store:
        rows = {r["recipe"]: r for r in store.rows(run_id)}
    assert rows["scale:0.5"]["metric_set"] == "refused"
    assert "inside the call" in rows["scale:0.5"]["metrics"]["refused"]
    assert rows["scale:0.9"]["metric_set"] == "full" and rows["scale:0.9"]["metrics"]["psnr"] < 60


def test_a_compile_recipe_reports_its_compiling_call_apart_and_is_not_reapplied_per_rep(tmp_path):
    from effdiff.api import accelerate

    run_id = run_bench(["m"], ["compile:backend=eager", "ddim:steps=2"], samples=2, steps=2, out_dir=tmp_path,
                       loader=tiny_pipeline, accelerate_fn=accelerate, timing_batch=2, progress=False)
    with ResultsStore(tmp_path / "results.sqlite") as store:
        rows = {r["recipe"]: r["metrics"] for r in store.rows(run_id)}
    compiled, plain = rows["compile:backend=eager"], rows["ddim:steps=2"]
    assert compiled["first_call_s"] > 0 and compiled["compile_seconds"] >= 0
    assert compiled["timing_mode"] == "adjacent blocks, compiled once" and plain["timing_mode"] == "alternating"
    assert plain["first_call_s"] is None and plain["compile_seconds"] is None


def test_every_compile_recipe_is_timed_from_a_fresh_dynamo_cache(tmp_path, monkeypatch):
    """Two compile recipes in one run: the second must compile its own graph, not reuse (or, past dynamo's
    recompile limit, silently run eager on) what the first left on the same module's code."""
    from effdiff.api import accelerate

    resets = []
    real_reset = torch._dynamo.reset
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1) or real_reset())
    run_bench(["m"], ["compile:backend=eager", "compile:backend=aot_eager", "ddim:steps=2"], samples=2, steps=2,
              out_dir=tmp_path, loader=tiny_pipeline, accelerate_fn=accelerate, timing_batch=2, progress=False)
    assert len(resets) == 2


def test_the_caller_leaves_to_a_recipe_the_arguments_it_decides():
    """A solver chooses its steps, a distilled student its steps and guidance: an explicit bench argument would
    override them (the first lcm rows ran at 50 steps with CFG)."""
    from types import SimpleNamespace

    import torch

    from effdiff.bench.runner import Caller

    calls = []

    class Pipe:
        def __call__(self, prompts, negative_prompt=None, output_type="pt", **kwargs):
            calls.append(kwargs)
            return SimpleNamespace(images=torch.zeros(len(prompts), 1, 4, 4))

    config = make_config(["m"], [], samples=2, steps=50, guidance=4.0, seeds=None, quick=False)
    pipe = Pipe()
    caller = Caller(pipe, config)
    for methods in ((), (SimpleNamespace(family="solver", values={"steps": 10}),),
                    (SimpleNamespace(family="distill", values={"steps": 4},
                                     decides=frozenset({"num_inference_steps", "guidance_scale"})),)):
        pipe.effdiff = SimpleNamespace(methods=methods)
        caller([0, 1])
    assert [sorted(k for k in c if k != "generator") for c in calls] == [
        ["guidance_scale", "num_inference_steps"], ["guidance_scale"], []]
