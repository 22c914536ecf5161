import pytest
from _fixtures import FakeAccelerate, one_thread, tiny_pipeline

from effdiff.bench.runner import image_dir, make_config, run_bench
from effdiff.bench.store import ResultsStore

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


def _run(out, accelerate, run_id=None, models=("m",), loader=tiny_pipeline):
    return run_bench(list(models), ["scale:0.5", "scale:0.9"], samples=4, steps=2, out_dir=out,
                     resume_run_id=run_id, loader=loader, accelerate_fn=accelerate, timing_batch=2,
                     progress=False)


def test_end_to_end_rows_and_resume_after_interruption(tmp_path):
    broken = FakeAccelerate(fail_on={"scale:0.9"})
    with ResultsStore(tmp_path / "results.sqlite") as store:
        store.start_run({"placeholder": True})  # an unrelated older run must not interfere
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, broken, run_id="r1")
    with ResultsStore(tmp_path / "results.sqlite") as store:
        rows = store.rows("r1")
    assert [r["recipe"] for r in rows] == ["", "scale:0.5"]
    base, half = (r["metrics"] for r in rows)
    assert base["nfe"] == 2 and half["nfe"] == 2  # 2 steps, CFG batched into one call per step
    assert base["speedup"] == 1.0 and base["psnr"] == 100.0 and base["ssim"] == pytest.approx(1.0)
    assert half["psnr"] < 60 and half["timing_mode"] == "alternating" and half["labels"] == ["simulated"]
    assert len(half["times_s"]) == 3 and half["time_per_image_s"] > 0 and half["speedup"] > 0
    assert half["flops_per_image"] > half["attention_flops_per_image"] > 0
    for key in ("fid", "fid_floor", "kid", "prompt_accuracy", "gflops_achieved"):
        assert half[key] is not None
    assert not hasattr(tiny_pipeline(), "effdiff")

    working = FakeAccelerate()
    assert _run(tmp_path, working, run_id="r1") == "r1"
    assert "scale:0.5" not in working.calls  # finished recipe skipped, not recomputed
    with ResultsStore(tmp_path / "results.sqlite") as store:
        after = store.rows("r1")
    assert [r["recipe"] for r in after] == ["", "scale:0.5", "scale:0.9"]
    assert [r["id"] for r in after[:2]] == [r["id"] for r in rows]
    assert (image_dir(tmp_path, "r1", "m") / "scale_0.9.png").exists()


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


def test_a_refusal_inside_the_call_leaves_the_pipeline_clean_for_the_next_recipe(tmp_path):
    run_id = _run(tmp_path, FakeAccelerate(refuse_in_call={"scale:0.5"}))
    with ResultsStore(tmp_path / "results.sqlite") as store:
        rows = {r["recipe"]: r for r in store.rows(run_id)}
    assert rows["scale:0.5"]["metric_set"] == "refused"
    assert "inside the call" in rows["scale:0.5"]["metrics"]["refused"]
    assert rows["scale:0.9"]["metric_set"] == "full" and rows["scale:0.9"]["metrics"]["psnr"] < 60
