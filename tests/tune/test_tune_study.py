"""The study: proxy targets as Optuna constraints, a repeated stack measured once, the front of what met the
targets, and one study filled by two processes through a database URL (as two machines would)."""

import optuna
import pytest
import torch.multiprocessing as mp

from effdiff.tune.space import Target, slots
from effdiff.tune.study import Objective, front, open_study, proxy_violations
from effdiff.tune.targets import parse_goal

UNET = Target("unet", "cpu", "UNet2DConditionModel", frozenset({"single"}))
GOALS = [parse_goal("psnr>=25"), parse_goal("acc>=-10")]


class FakeJudge:
    """Deterministic proxy numbers from the recipe text: more methods, faster and less faithful."""

    def __init__(self) -> None:
        self.measured: list[str] = []

    def measure(self, recipe: str, timed: bool = True) -> dict:
        self.measured.append(recipe)
        parts = recipe.count("+") + 1
        return {"speedup": 1.0 + parts + len(recipe) % 7 / 10, "psnr": 40.0 - 6 * parts, "ssim": 0.9,
                "prompt_accuracy": 1.0 - 0.05 * parts, "baseline_prompt_accuracy": 1.0, "labels": [], "nfe": 10}


def quiet(_line: str) -> None:
    """Tests read the study, not the progress lines."""


def test_proxy_targets_are_constraints_and_fid_waits_for_the_confirmation():
    metrics = {"psnr": 27.0, "prompt_accuracy": 0.85, "baseline_prompt_accuracy": 1.0}
    assert proxy_violations(GOALS, metrics) == pytest.approx([-2.0, 0.05])  # PSNR met by 2 dB, accuracy missed
    assert proxy_violations([parse_goal("fid<=+10%")], metrics) == [0.0]  # nothing a few samples can check
    assert proxy_violations([parse_goal("acc>=99")], {"prompt_accuracy": None}) == [0.0]  # a speed-only twin


def test_the_front_holds_only_stacks_that_met_the_proxy_targets(tmp_path):
    study = open_study("s", str(tmp_path / "t.sqlite"), goals=GOALS)
    judge = FakeJudge()
    study.optimize(Objective(judge, slots(UNET), GOALS, 50, quiet), n_trials=40, catch=(Exception,))
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(judge.measured) == len(set(judge.measured))  # a stack suggested again reuses its measurement
    assert len(done) > len(judge.measured) or len(done) == len(set(t.user_attrs["recipe"] for t in done))
    points = front(study)
    assert points and all(p["psnr"] >= 25 for p in points)  # 3+ methods miss the PSNR target: never on it
    speeds = [p["speedup"] for p in points]
    assert speeds == sorted(speeds, reverse=True)
    assert all(not (q["speedup"] >= p["speedup"] and q["psnr"] > p["psnr"]) for p in points for q in points)


def _fill(rank: int, url: str) -> None:
    study = open_study("shared", url, goals=GOALS)
    study.optimize(Objective(FakeJudge(), slots(UNET), GOALS, 50, quiet), n_trials=6, catch=(Exception,))


def test_two_processes_fill_one_study_through_a_database_url(postgres_url):
    mp.spawn(_fill, args=(postgres_url,), nprocs=2, join=True)
    study = open_study("shared", postgres_url)
    trials = [t for t in study.trials if t.state.is_finished()]
    assert len(trials) == 12  # both searchers' trials, in one study
    recipes = [t.user_attrs.get("recipe") for t in trials]
    assert len(set(recipes)) > 6  # seeded apart: not the same six suggestions twice
