"""The search of ``effdiff tune``: an Optuna study over the registry's stacks, scored by cheap proxies.

Why Optuna and not our own search: its multi-objective TPE and NSGA-II samplers handle conditional spaces (a
method's knobs exist only when the method is chosen) and constraints, and its RDB storage is the resumable,
shareable record of a search — SQLite by default (every finished trial is committed, so a killed search loses
only the trial it was in), a database URL to let several machines fill one study.

Objectives: the paired wall-clock speed-up (or, with ``speed="flops"``, the ratio of the denoiser's FLOPs: free of
timing noise and machine-independent, blind to overheads) and the PSNR against the baseline's images on the proxy
samples, both maximised. Targets that proxies can measure (PSNR, SSIM, accuracy) are Optuna constraints;
FID/KID are left to the confirmation on many samples (``tune/run.py``). The hand-written stacks of the bench are
enqueued first, so the search starts from what a person would write and can only add to it.
"""

from __future__ import annotations

import secrets
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from effdiff.errors import RecipeError
from effdiff.recipe import parse
from effdiff.registry import Method
from effdiff.tune.proxy import ProxyJudge
from effdiff.tune.space import NONE, method_knobs, resources, suggest
from effdiff.tune.targets import Goal

PROXY_METRICS = ("psnr", "ssim", "prompt_accuracy")  # what a handful of samples can check; FID needs many
SPEEDS = {"time": "speedup", "flops": "flops_ratio"}  # --speed -> the proxy metric the search maximises


def storage_url(location: str) -> str:
    """A database URL as given; a file path becomes SQLite (``sqlite:///abs/path``)."""
    from pathlib import Path

    if "://" in location:
        return location
    path = Path(location).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def open_study(name: str, storage: str, sampler: str = "tpe", seed: int = 0, goals: Sequence[Goal] = ()) -> Any:
    """Create or load the study ``name``; the sampler is seeded past the trials already stored, so a resumed
    search does not repeat its first suggestions, and, in a database several machines share, at random, so
    two searchers starting together do not suggest the same stacks."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own line per trial; a crash is logged by Objective
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # multivariate TPE, constraints
    rdb = _storage(storage_url(storage))
    shared = not rdb.url.startswith("sqlite")  # pid plus trial count could coincide between two searchers: draw
    offset = secrets.randbelow(2**31) if shared else _stored_trials(rdb, name)
    constraints = _constraints_of(goals)
    if sampler == "nsga2":
        chosen = optuna.samplers.NSGAIISampler(seed=seed + offset, constraints_func=constraints)
    elif sampler == "tpe":
        chosen = optuna.samplers.TPESampler(seed=seed + offset, constraints_func=constraints, multivariate=True,
                                            group=True, n_startup_trials=12)
    else:
        raise ValueError(f"--sampler must be tpe or nsga2, got {sampler!r}")
    return optuna.create_study(study_name=name, storage=rdb, sampler=chosen, load_if_exists=True,
                               directions=["maximize", "maximize"])


def _storage(url: str, attempts: int = 5) -> Any:
    """Optuna's RDB storage of ``url``, with heartbeats (a killed searcher's trial is failed, not left running).
    Searchers starting together on an empty database race to create its tables: the loser retries."""
    import optuna
    from sqlalchemy.exc import DBAPIError

    for attempt in range(attempts - 1):
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=90)
        except DBAPIError:
            time.sleep(0.5 * (attempt + 1))
    return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=90)


def _stored_trials(storage: Any, name: str) -> int:
    try:
        return len(storage.get_all_trials(storage.get_study_id_from_name(name), deepcopy=False))
    except KeyError:
        return 0


def _constraints_of(goals: Sequence[Goal]) -> Callable[[Any], list[float]]:
    """Optuna's constraint values of a trial: one per proxy-measurable goal, <= 0 when it is met."""
    def constraints(trial: Any) -> list[float]:
        return list(trial.user_attrs["constraints"])

    return constraints


def proxy_violations(goals: Sequence[Goal], metrics: dict[str, Any]) -> list[float]:
    """Per proxy-measurable goal, how far the proxy metrics miss it (<= 0: met); [0] when none is measurable."""
    out = []
    for goal in goals:
        if goal.metric not in PROXY_METRICS:
            continue
        value = metrics.get(goal.metric)
        if value is None:  # accuracy of a speed-only twin: nothing to hold against
            out.append(0.0)
            continue
        out.append(-goal.margin(value, metrics.get(f"baseline_{goal.metric}")))  # only accuracy is ever relative
    return out or [0.0]


def params_of(recipe: str, space: dict[str, list[str]], max_steps: int) -> dict[str, Any] | None:
    """The trial parameters that make ``suggest`` produce ``recipe`` (to enqueue it), or None when it is not
    in the space (a method left out, a knob outside its searched range, more steps than the baseline's)."""
    try:
        methods = parse(recipe)
    except RecipeError:
        return None
    chosen: dict[str, Method] = {}
    for method in methods:
        slot = next((s for s, names in space.items() if method.name in names), None)
        if slot is None or slot in chosen:
            return None
        chosen[slot] = method
    params: dict[str, Any] = {}
    taken: set[str] = set()
    for slot in space:
        if slot in taken:
            if slot in chosen:
                return None  # two methods on one resource
            continue
        method = chosen.get(slot)
        params[f"slot:{slot}"] = method.name if method else NONE
        if method is None:
            continue
        taken |= resources(method.name)
        knobs = method_knobs(method, max_steps)
        if knobs is None:
            return None
        params.update(knobs)
    return params


class Refused(RecipeError):
    """A trial's stack was refused before it computed anything (the study catches it: the search goes on)."""


class Objective:
    """One trial: suggest a stack, refuse it before compute if the registry does, else measure it by proxy."""

    def __init__(self, judge: ProxyJudge, space: dict[str, list[str]], goals: Sequence[Goal], max_steps: int,
                 log: Callable[[str], None] = print, speed: str = "time",
                 propose: Callable[[Any], str] | None = None, quality: str = "psnr") -> None:
        if speed not in SPEEDS:
            raise ValueError(f"--speed must be one of {', '.join(SPEEDS)}, got {speed!r}")
        self.judge, self.space, self.goals, self.max_steps, self.log = judge, space, goals, max_steps, log
        self.propose = propose or (lambda trial: suggest(trial, self.space, self.max_steps))
        self.quality = quality  # the second objective: "psnr" (higher is better) or "fid" (maximised negated)
        self.speed = SPEEDS[speed]
        self.measured: dict[str, dict[str, Any]] = {}  # recipe -> metrics, within this process

    def __call__(self, trial: Any) -> tuple[float, float]:
        try:
            recipe = self.propose(trial)
        except RecipeError as refusal:
            return self._refused(trial, "", refusal)
        if not recipe:
            return self._refused(trial, "", RecipeError("the empty stack is the baseline itself"))
        trial.set_user_attr("recipe", recipe)
        metrics = self.measured.get(recipe) or _stored_metrics(trial.study, recipe)
        if metrics is None:
            start = time.perf_counter()
            try:
                timed = self.speed == "speedup"
                metrics = self.judge.measure(recipe, timed)
                if "loaded" in metrics["labels"]:  # another process took a core while timing: measure again
                    metrics = self.judge.measure(recipe, timed)
            except RecipeError as refusal:
                return self._refused(trial, recipe, refusal)
            except Exception as crash:  # a stack that breaks is a finding: recorded, shown, and the search goes on
                trial.set_user_attr("error", f"{type(crash).__name__}: {crash}")
                self.log(f"  trial {trial.number:>3}: {recipe} CRASHED: {type(crash).__name__}: {crash}")
                raise
            metrics["seconds"] = time.perf_counter() - start
        else:
            trial.set_user_attr("repeat", True)  # the same stack again: its stored measurement, no new compute
        self.measured[recipe] = metrics
        for key, value in metrics.items():
            trial.set_user_attr(key, value)
        violations = proxy_violations(self.goals, metrics)
        trial.set_user_attr("constraints", violations)
        feasible = all(v <= 0 for v in violations)
        fid = f"  FID {metrics['fid']:.3f} (baseline {metrics['baseline_fid']:.3f})" if "fid" in metrics else ""
        self.log(f"  trial {trial.number:>3}: {recipe:<58} {metrics[self.speed]:5.2f}x  "
                 f"PSNR {metrics['psnr']:6.2f} dB{fid}{'' if feasible else '  (misses a target)'}")
        return metrics[self.speed], -metrics["fid"] if self.quality == "fid" else metrics["psnr"]

    def _refused(self, trial: Any, recipe: str, refusal: Exception) -> Any:
        """A stack the registry or a method refused: a failed trial with its reason. Failed, not pruned: Optuna's
        multi-objective TPE reads a pruned trial's (absent) values and breaks on them."""
        trial.set_user_attr("recipe", recipe)
        trial.set_user_attr("refused", str(refusal))
        raise Refused(str(refusal))


def _stored_metrics(study: Any, recipe: str) -> dict[str, Any] | None:
    """A finished trial's measurement of the same recipe (another process, or before a resume)."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if trial.user_attrs.get("recipe") == recipe and "psnr" in trial.user_attrs:
            return {k: v for k, v in trial.user_attrs.items() if k not in ("recipe", "constraints", "repeat")}
    return None


def spent_seconds(study: Any) -> float:
    """Search time already spent on this study (finished trials' durations), over every process and resume."""
    return sum(t.duration.total_seconds() for t in study.get_trials(deepcopy=False) if t.duration is not None)


def front(study: Any) -> list[dict[str, Any]]:
    """The proxy-feasible Pareto front (speed-up, PSNR), fastest first, one entry per recipe."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if all(v <= 0 for v in t.user_attrs.get("constraints", [1.0]))]
    points: dict[str, tuple[float, float, Any]] = {}
    for t in done:
        points.setdefault(t.user_attrs["recipe"], (t.values[0], t.values[1], t))
    kept = [(s, q, t) for s, q, t in points.values()
            if not any(s2 >= s and q2 >= q and (s2, q2) != (s, q) for s2, q2, _ in points.values())]
    return [{"recipe": t.user_attrs["recipe"], "speedup": s, "psnr": q, "trial": t.number}
            for s, q, t in sorted(kept, key=lambda p: -p[0])]
