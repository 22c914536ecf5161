"""``effdiff tune``: the fastest stack that keeps quality on the user's model, found, confirmed and saved.

Stages, each resumable. (1) Tuning steps: the tuners of the methods named by ``--calibrate`` (TeaCache's
polynomial, the L2C router) run first, so the search tries calibrated methods. (2) The search (``study.py``):
Optuna over the registry's stacks, scored by proxies on a few samples, within a time budget summed over every
process and resume. (3) The confirmation: the proxy front's fastest stacks go through ``effdiff bench`` on many
samples — FID/KID, prompt accuracy and the paired speed-up against the baseline in one process. (4) Optional
refinement (``--refine-samples N``): PSNR on a few samples does not track FID (a fast stack can lose 10 dB and
keep its FID), so the confirmed stack's own knobs (step count, cache interval, threshold…) are searched again
with speed and FID on N samples as the objectives (the proxy targets stay constraints), and the refined front
is confirmed on many samples like stage 3. FID is an objective there, not a constraint: at a few hundred samples
its differences are exaggerated (measured on tiny-sd: the confirmed stack +6.6 % at 1,000 samples, +16 % at 200),
so a bound would refuse what the confirmation accepts; the confirmation decides. The fastest confirmed row that
meets every target is saved as ``tuned:NAME`` with the numbers it was validated on. A target no row meets is a
clear error naming the best found; a recipe that violates a target is never chosen.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from effdiff.errors import RecipeError
from effdiff.tune.targets import Goal, parse_goal

CONFIRM_SEED = 2_000_000  # a speed-only twin's confirmation: fresh seeds, apart from the proxies'
REFINE_SEED = 3_000_000  # the refinement's samples: apart from the proxies' and the confirmation's
UNCHOOSABLE = ("refused", "cost≠quality")  # rows whose numbers are not a measurement of the saved recipe


class TuneError(ValueError):
    """No stack met the targets: the message names the best one found and by how much it missed."""


@dataclass(frozen=True)
class TuneSettings:
    """What decides a tuning run; the fields that change measurements name the study, so a resume finds it."""

    model: str
    targets: tuple[str, ...]
    budget_s: float = 1800.0
    trials: int | None = None  # a cap on the study's trials (over every resume); the budget still applies
    proxy_samples: int = 8
    confirm_samples: int = 1000
    confirm_top: int = 8
    refine_samples: int = 0  # 0: no refinement stage
    refine_trials: int = 24
    steps: int = 50
    guidance: float = 4.0
    timing_batch: int = 2
    sampler: str = "tpe"
    speed: str = "time"  # the search's speed objective: "time" (paired wall clock) or "flops" (denoiser FLOPs ratio)
    seed: int = 0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    calibrate: tuple[str, ...] = ()
    device: str = "cpu"
    out_dir: str = "effdiff-tune"
    storage: str | None = None  # default: OUT_DIR/tune.sqlite
    study: str | None = None
    name: str | None = None

    def goals(self) -> list[Goal]:
        if not self.targets:
            raise ValueError("give at least one --target (e.g. psnr>=30, fid<=+10%, acc>=-1)")
        return [parse_goal(text) for text in self.targets]

    def study_name(self) -> str:
        if self.study:
            return self.study
        keyed = {k: getattr(self, k) for k in ("model", "targets", "proxy_samples", "steps", "guidance",
                                               "timing_batch", "sampler", "speed", "seed", "include", "exclude",
                                               "calibrate", "device")}
        digest = hashlib.sha1(json.dumps(keyed, sort_keys=True, default=list).encode()).hexdigest()[:8]
        return f"{self.model.replace('/', '--')}-{digest}"

    def storage_location(self) -> str:
        return self.storage or str(Path(self.out_dir) / "tune.sqlite")


@dataclass
class TuneResult:
    name: str
    recipe: str
    path: Path
    study: str
    run_id: str | None
    metrics: dict[str, Any]
    baseline: dict[str, Any]
    front: list[dict[str, Any]] = field(default_factory=list)
    report: Path | None = None
    search_seconds: float = 0.0
    confirm_seconds: float = 0.0


def tune(settings: TuneSettings, loader: Callable[[str], Any] | None = None, accelerate_fn: Any = None,
         log: Callable[[str], None] = print) -> TuneResult:
    """Search, confirm and save; see the module docstring. ``loader``: model name -> pipeline (default: zoo)."""
    from effdiff.tune.study import front, spent_seconds
    from effdiff.tuned import check_name, save_tuned

    goals = settings.goals()  # malformed targets and names fail before any model loads
    name = check_name(settings.name or settings.study_name())
    refine_ok = settings.refine_samples == 0 or settings.refine_samples >= 2
    if (settings.budget_s <= 0 or settings.proxy_samples < 2 or settings.confirm_samples < 2
            or settings.confirm_top < 1 or not refine_ok or settings.refine_trials < 1):
        raise ValueError("--budget must be > 0, --proxy-samples and --confirm-samples >= 2, --confirm-top >= 1, "
                         "--refine-samples 0 (off) or >= 2, --refine-trials >= 1")
    if loader is None:
        from effdiff.zoo import check_model, load

        check_model(settings.model)
        loader = lambda name: load(name).to(settings.device)  # noqa: E731
    pipe = loader(settings.model)
    speed_only = bool(getattr(pipe, "effdiff_speed_only", False))
    unmeasurable = [g.text for g in goals if speed_only and g.metric not in ("psnr", "ssim")]
    if unmeasurable:
        raise ValueError(f"{settings.model} is a speed-only model (random weights): it has no FID, KID or accuracy "
                         f"to hold {', '.join(unmeasurable)} against; tune it against psnr>=… or ssim>=… (its "
                         "baseline's own images)")
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    _calibrate(pipe, settings, goals, log)
    study = _search(pipe, settings, goals, accelerate_fn, log)
    search_seconds = spent_seconds(study)
    candidates = [c for c in front(study) if c["speedup"] > 1.0]  # a stack no faster than the baseline is no answer
    if not candidates:
        raise TuneError(_no_front_message(study, goals))
    chosen = candidates[: settings.confirm_top]
    log("proxy front (fastest first): " + "; ".join(f"{c['recipe']} {c['speedup']:.2f}x {c['psnr']:.1f} dB"
                                                     for c in candidates))
    start = time.perf_counter()
    if speed_only:
        run_id, baseline = None, {"psnr": 100.0, "ssim": 1.0}
        rows = _confirm_by_proxy(pipe, chosen, settings, accelerate_fn, goals, baseline)
    else:
        run_id, rows, baseline = _confirm_by_bench(pipe, chosen, settings, study, accelerate_fn, goals)
    best = _choose(rows, baseline, goals)
    if settings.refine_samples and not speed_only:
        seed = best or _closest(rows, baseline, goals)
        if seed is not None:
            refined = _refine(pipe, settings, goals, study, seed, accelerate_fn, log)
            if refined is not None and (best is None or refined["metrics"]["speedup"] > best["metrics"]["speedup"]):
                run_id, rows, baseline, best = refined["run_id"], refined["rows"], refined["baseline"], refined
    confirm_seconds = time.perf_counter() - start
    if best is None:
        raise TuneError(_missed_message(rows, baseline, goals, settings.confirm_samples))
    record = {
        "recipe": best["recipe"], "model": settings.model, "targets": list(settings.targets),
        "validated": {g.metric: best["metrics"].get(g.metric) for g in goals},
        "speedup": best["metrics"]["speedup"], "baseline": {g.metric: baseline.get(g.metric) for g in goals},
        "confirm_samples": settings.confirm_samples, "confirm_run": run_id, "study": study.study_name,
        "storage": settings.storage_location(), "steps": settings.steps, "guidance": settings.guidance,
        "search_seconds": round(search_seconds, 1), "confirm_seconds": round(confirm_seconds, 1),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"), "settings": asdict(settings),
    }
    path = save_tuned(name, record)
    (Path(settings.out_dir) / f"tuned-{name}.json").write_text(path.read_text())  # the run's own copy, with its report
    report = _write_report(study, run_id, settings, best["recipe"]) if run_id else None
    log(f"tuned:{name} = {best['recipe']} ({best['metrics']['speedup']:.2f}x; "
        + ", ".join(f"{g.text}: {_show(g, best['metrics'].get(g.metric), baseline.get(g.metric))}" for g in goals)
        + f" on {settings.confirm_samples} samples) saved to {path}")
    return TuneResult(name, best["recipe"], path, study.study_name, run_id, best["metrics"], baseline, candidates,
                      report, search_seconds, confirm_seconds)


def _search(pipe: Any, settings: TuneSettings, goals: list[Goal], accelerate_fn: Any,
            log: Callable[[str], None]) -> Any:
    """Open (or resume) the study, enqueue the hand-written stacks on a fresh one, and search for what is left of
    the budget and the trial cap; returns the study."""
    from effdiff.tune.proxy import ProxyJudge
    from effdiff.tune.space import Target, slots, without_unavailable
    from effdiff.tune.study import Objective, open_study, params_of, spent_seconds

    space, left_out = without_unavailable(slots(Target.of(pipe), include=(*settings.include, *settings.calibrate),
                                                exclude=settings.exclude), pipe)
    for name, why in left_out.items():
        log(f"left out {name}: {why}")
    if not space:
        raise RecipeError(f"no registered method applies to {settings.model} with these --include/--exclude")
    log(f"search space: {', '.join(f'{slot}: {len(names)} methods' for slot, names in space.items())}")
    study = open_study(settings.study_name(), settings.storage_location(), settings.sampler, settings.seed, goals)
    if not study.trials:
        for recipe in _hand_written():
            params = params_of(recipe, space, settings.steps)
            if params is not None:
                study.enqueue_trial(params, user_attrs={"hand_written": True}, skip_if_exists=True)
    remaining = settings.budget_s - spent_seconds(study)
    finished = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
    left = None if settings.trials is None else settings.trials - finished
    log(f"study {study.study_name} in {settings.storage_location()}: {finished} trials finished, "
        f"{max(remaining, 0):.0f} s of the {settings.budget_s:.0f} s budget left")
    if remaining > 0 and (left is None or left > 0):
        judge = ProxyJudge(pipe, settings.proxy_samples, settings.steps, settings.guidance, settings.timing_batch,
                           accelerate_fn=accelerate_fn)
        objective = Objective(judge, space, goals, settings.steps, log, settings.speed)
        study.optimize(objective, n_trials=left, timeout=remaining,
                       gc_after_trial=False, catch=(Exception,))
    crashed = sorted({t.user_attrs["recipe"] for t in study.get_trials(deepcopy=False) if "error" in t.user_attrs})
    if crashed:
        log(f"{len(crashed)} stacks crashed (kept in the study with their errors): {'; '.join(crashed)}")
    return study


def _calibrate(pipe: Any, settings: TuneSettings, goals: list[Goal], log: Callable[[str], None]) -> None:
    """Run the tuners of ``--calibrate``'s methods (a tuning step before the search)."""
    from effdiff.calling import conditions_for
    from effdiff.registry import get_method

    psnr = next((g.value for g in goals if g.metric == "psnr"), 30.0)
    for method_name in settings.calibrate:
        method = get_method(method_name)
        if not method.tuner:
            raise RecipeError(f"{method.name} has nothing to calibrate (--calibrate takes a method with a tuner)")
        tuner = importlib.import_module(method.tuner)
        prompts = conditions_for(pipe, 4, "calibration")
        log(tuner.run(pipe, settings.model, prompts, settings.steps, settings.guidance, psnr, settings.seed, None))


def _hand_written() -> list[str]:
    """The bench's curated stacks: the search starts from what a person would write."""
    from effdiff.bench.defaults import DEFAULT, FULL_ONLY

    return [*DEFAULT, *FULL_ONLY]


def _confirm_by_bench(pipe: Any, chosen: list[dict[str, Any]], settings: TuneSettings, study: Any,
                      accelerate_fn: Any, goals: list[Goal]) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """The candidates through ``effdiff bench`` on many samples, fastest first, until one meets every goal: the
    fast ones cost least to confirm, and the first that passes is the answer, so the slower ones are never
    generated. Resumes this study's earlier confirmation."""
    from effdiff.bench.runner import run_bench
    from effdiff.bench.store import ResultsStore

    recipes = [c["recipe"] for c in chosen]
    previous = study.user_attrs.get("confirm")
    resume = previous["run_id"] if previous and previous.get("recipes") == recipes else None

    def remember(run_id: str) -> None:
        study.set_user_attr("confirm", {"run_id": run_id, "recipes": recipes})

    baseline: dict[str, Any] = {}

    def enough(_model: str, recipe: str, metrics: dict[str, Any]) -> bool:
        if not recipe:
            baseline.update(metrics, psnr=100.0, ssim=1.0)
            return False
        return _choose([{"recipe": recipe, "metrics": metrics}], baseline, goals) is not None

    run_id = run_bench([settings.model], recipes, samples=settings.confirm_samples, steps=settings.steps,
                       guidance=settings.guidance, out_dir=settings.out_dir, resume_run_id=resume,
                       loader=lambda _name: pipe, accelerate_fn=accelerate_fn, on_start=remember,
                       progress=False, until=enough)
    with ResultsStore(Path(settings.out_dir) / "results.sqlite") as store:
        rows = store.rows(run_id)
    baseline = next(r["metrics"] for r in rows if not r["recipe"])
    return run_id, [r for r in rows if r["recipe"]], {**baseline, "psnr": 100.0, "ssim": 1.0}


def _refine(pipe: Any, settings: TuneSettings, goals: list[Goal], study: Any, seed: dict[str, Any],
            accelerate_fn: Any, log: Callable[[str], None]) -> dict[str, Any] | None:
    """Stage 4: search the knobs of ``seed``'s stack for speed and FID on ``refine_samples`` samples (the proxy
    targets as constraints), then confirm the refined front's stacks faster than the seed on many samples. Returns
    the fastest confirmed row meeting every target (with its run, rows and baseline), or None."""
    from optuna.trial import TrialState

    from effdiff.tune.proxy import ProxyJudge
    from effdiff.tune.space import knob_params, refine
    from effdiff.tune.study import Objective, front, open_study

    recipe = seed["recipe"]
    digest = hashlib.sha1(f"{recipe}|{settings.refine_samples}|fid".encode()).hexdigest()[:8]
    refined = open_study(f"{study.study_name}-refine-{digest}", settings.storage_location(), settings.sampler,
                         settings.seed, goals)
    if not refined.trials and (params := knob_params(recipe, settings.steps)) is not None:
        refined.enqueue_trial(params)
    left = settings.refine_trials - sum(t.state.is_finished() for t in refined.get_trials(deepcopy=False))
    log(f"refining {recipe} ({seed['metrics']['speedup']:.2f}x confirmed): its knobs, speed and FID on "
        f"{settings.refine_samples} samples, {max(left, 0)} trials")
    if left > 0:
        judge = ProxyJudge(pipe, settings.refine_samples, settings.steps, settings.guidance, settings.timing_batch,
                           accelerate_fn=accelerate_fn, seed=REFINE_SEED, distribution=True)
        objective = Objective(judge, {}, goals, settings.steps, log, settings.speed,
                              propose=lambda trial: refine(trial, recipe, settings.steps), quality="fid")
        refined.optimize(objective, n_trials=left, gc_after_trial=False, catch=(Exception,))
    done = refined.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    floor = next((t.values[0] for t in done if t.user_attrs.get("recipe") == recipe), seed["metrics"]["speedup"])
    faster = [c for c in front(refined) if c["speedup"] > floor]  # timed as the seed was, in this study
    if not faster:
        log("refinement: no refined stack on the speed/FID front is faster than the one it started from")
        return None
    log("refined front (fastest first): " + "; ".join(f"{c['recipe']} {c['speedup']:.2f}x" for c in faster))
    run_id, rows, baseline = _confirm_by_bench(pipe, faster[: settings.confirm_top], settings, refined,
                                               accelerate_fn, goals)
    best = _choose(rows, baseline, goals)
    return None if best is None else {**best, "run_id": run_id, "rows": rows, "baseline": baseline}


def _confirm_by_proxy(pipe: Any, chosen: list[dict[str, Any]], settings: TuneSettings, accelerate_fn: Any,
                      goals: list[Goal], baseline: dict[str, Any]) -> list[dict[str, Any]]:
    """A speed-only twin has no FID: PSNR/SSIM against its own baseline on fresh seeds, many samples, fastest
    candidate first, until one meets every goal."""
    from effdiff.tune.proxy import ProxyJudge

    judge = ProxyJudge(pipe, settings.confirm_samples, settings.steps, settings.guidance, settings.timing_batch,
                       accelerate_fn=accelerate_fn, seed=CONFIRM_SEED)
    rows = []
    for candidate in chosen:
        try:
            rows.append({"recipe": candidate["recipe"], "metrics": judge.measure(candidate["recipe"])})
        except RecipeError as refusal:
            rows.append({"recipe": candidate["recipe"], "metrics": {"labels": ["refused"], "refused": str(refusal)}})
        if _choose(rows[-1:], baseline, goals) is not None:
            break
    return rows


def _choose(rows: list[dict[str, Any]], baseline: dict[str, Any], goals: list[Goal]) -> dict[str, Any] | None:
    """The fastest confirmed row meeting every goal; rows that do not measure the recipe are never chosen."""
    ok = [r for r in rows if not set(r["metrics"].get("labels") or ()) & set(UNCHOOSABLE)
          and r["metrics"].get("speedup") is not None
          and all(g.met(r["metrics"].get(g.metric), baseline.get(g.metric)) for g in goals)]
    return max(ok, key=lambda r: r["metrics"]["speedup"], default=None)


def _show(goal: Goal, value: float | None, baseline: float | None) -> str:
    if value is None:
        return "not measured"
    scale = 100 if goal.metric == "prompt_accuracy" else 1
    text = f"{value * scale:.4g}"
    if goal.relative and baseline:
        text += f" vs baseline {baseline * scale:.4g} (bound {goal.bound(baseline) * scale:.4g})"
    return text


def _closest(rows: list[dict[str, Any]], baseline: dict[str, Any], goals: list[Goal]) -> dict[str, Any] | None:
    """The measured row that misses the goals by least (summed relative shortfall), the refinement's seed when
    nothing met them."""
    measured = [r for r in rows if r["metrics"].get("speedup") is not None]

    def shortfall(row: dict[str, Any]) -> float:
        return sum(max(0.0, -g.margin(row["metrics"][g.metric], baseline.get(g.metric))) / max(abs(g.bound(
            baseline.get(g.metric))), 1e-9) if row["metrics"].get(g.metric) is not None else 1.0 for g in goals)

    return min(measured, key=shortfall, default=None)


def _missed_message(rows: list[dict[str, Any]], baseline: dict[str, Any], goals: list[Goal], samples: int) -> str:
    best = _closest(rows, baseline, goals)
    if best is None:
        return f"no candidate could be measured on {samples} samples: " + "; ".join(
            f"{r['recipe']}: {r['metrics'].get('refused', 'refused')}" for r in rows)
    missed = [f"{g.text}: {_show(g, best['metrics'].get(g.metric), baseline.get(g.metric))}" for g in goals
              if not g.met(best["metrics"].get(g.metric), baseline.get(g.metric))]
    return (f"no stack met {', '.join(g.text for g in goals)} on {samples} samples; the closest was "
            f"{best['recipe']} ({best['metrics']['speedup']:.2f}x), which missed {'; '.join(missed)}. "
            "Loosen the target, or give the search more --budget")


def _no_front_message(study: Any, goals: list[Goal]) -> str:
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return "no stack could be measured within the budget (every trial was refused or failed); give more --budget"
    best = min(done, key=lambda t: (max(t.user_attrs["constraints"]), -t.values[0]))  # least missed, then fastest
    return (f"no stack faster than the baseline met {', '.join(g.text for g in goals)} on the proxy samples; "
            f"the closest was {best.user_attrs['recipe']} ({best.values[0]:.2f}x, "
            f"PSNR {best.user_attrs['psnr']:.1f} dB, accuracy {_percent(best.user_attrs.get('prompt_accuracy'))})"
            ". Loosen the target")


def _percent(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.0%}"


def _write_report(study: Any, run_id: str, settings: TuneSettings, chosen: str) -> Path:
    """The confirmation run's HTML report (Pareto plots of speed-up vs FID and vs accuracy) with the search's
    proxy scatter beside it."""
    from effdiff.bench.report import load_rows, write_html
    from effdiff.tune.plot import search_png

    out = Path(settings.out_dir)
    figure = out / f"tune-{study.study_name}.png"
    figure.write_bytes(search_png(study, chosen))
    _, all_rows = load_rows(out, run_id)
    return write_html(all_rows, run_id, out, out / f"tune-{study.study_name}.html", figures=[figure])
