"""``run_bench``: every recipe against its own baseline, on the same prompts and seeds, in one process.

Per model the baseline (empty recipe: the pipeline as loaded, DDIM, CFG) comes first, then each
recipe. For each one: FLOPs and NFE on the timed batch, then warm, alternating baseline/variant
timing (median of >= 3) with a stage split, peak memory and the load other processes put on the
machine meanwhile, then, for trained models, all samples for PSNR/SSIM (vs the baseline's images),
FID/KID (vs held-out, with the real-vs-real floor) and prompt accuracy, each with a bootstrap interval
and a paired verdict against the baseline. Each (model, recipe) row is committed when done.

Cost and quality must describe the same computation (MEASURE.md rule 7): a dynamic method (a
threshold cache) decides per batch, so the denoiser's FLOPs per image are counted on the timed batch
*and* over the quality samples; a row whose two disagree is labelled ``cost≠quality`` and kept off the
Pareto front. (The denoiser's alone: the caption cache and the once-per-call negative prompt make the
text encoder's share depend on the batch for every recipe, the baseline included.)
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from effdiff.bench import validate
from effdiff.bench.store import Environment, ResultsStore
from effdiff.calling import call_parameters, to_images
from effdiff.eval.cost import (
    ForeignLoad,
    NFECounter,
    PeakMemory,
    StageTimer,
    StageTimes,
    Timing,
    achieved_gflops,
    count_flops,
    find_denoiser,
    time_alternating,
    time_call,
    timed,
)
from effdiff.recipe import RecipeError

SLOW_APPLY_S = 1.0  # re-applying a recipe slower than this for every repetition is impractical
STORE_NAME = "results.sqlite"
QUICK_STEPS, QUICK_SAMPLES = 10, 10
NOISY_SPREAD = 0.2  # (max - min) / median of the per-repetition speed-ups above this: the row is noisy
LOADED_CORES = 0.5  # other processes kept this many cores busy during the timing: the row is loaded
WORK_MISMATCH = 0.05  # FLOPs per image on the timed batch vs over the samples, relative: cost≠quality


@dataclass(frozen=True)
class BenchConfig:
    """Everything that decides the numbers; its hash ties resumed runs to their start."""

    models: tuple[str, ...]
    recipes: tuple[str, ...]
    samples: int
    steps: int
    guidance: float
    seeds: tuple[int, ...] | None
    quick: bool
    timing_batch: int
    reps: int
    gen_batch: int

    def seed_list(self) -> list[int]:
        return list(self.seeds) if self.seeds is not None else list(range(self.samples))


def make_config(models: Sequence[str], recipes: Sequence[str], samples: int, steps: int, guidance: float,
                seeds: Sequence[int] | None, quick: bool, timing_batch: int = 4, reps: int = 3,
                gen_batch: int = 32) -> BenchConfig:
    """Validate and normalise arguments: baseline first, quick-mode caps applied, seeds checked.

    Quick mode caps the baseline at 10 steps and scales every solver's step count by the same factor,
    so a solver row compares like with like (``dpmpp2m:steps=20`` against 50 becomes ``steps=4`` against 10).
    """
    if not models:
        raise ValueError("no model to benchmark; name one with --model")
    validate.steps(steps)
    validate.guidance(guidance)
    validate.at_least(timing_batch, 1, "--timing-batch", "images per timed call")
    validate.at_least(samples, 2, "--samples", "FID/KID need two images")
    ordered = ["", *[r.strip() for r in recipes if r.strip()]]
    if quick:
        factor = min(steps, QUICK_STEPS) / steps
        steps, samples, timing_batch = min(steps, QUICK_STEPS), min(samples, QUICK_SAMPLES), min(timing_batch, 2)
        ordered = [scale_solver_steps(r, factor) for r in ordered]
    ordered = list(dict.fromkeys(ordered))
    if seeds is not None and len(seeds) != samples:
        raise ValueError(f"{len(seeds)} seeds given for {samples} samples; give one seed per sample")
    return BenchConfig(tuple(models), tuple(ordered), samples, steps, guidance,
                       tuple(seeds) if seeds is not None else None, quick,
                       min(timing_batch, samples), max(reps, 3), gen_batch)


def scale_solver_steps(recipe: str, factor: float) -> str:
    """The recipe with each solver's ``steps`` multiplied by ``factor`` (at least 1); the other parts verbatim."""
    from effdiff.recipe import parse, split

    parts = []
    for part in split(recipe):
        try:
            method = parse(part)[0]
        except RecipeError:  # not a registry recipe (a benchmark's peer package, a test's fake): nothing to scale
            return recipe
        if method.family == "solver" and "steps" in method.values and factor != 1:
            steps = max(1, round(method.values["steps"] * factor))
            kept = [kv.strip() for kv in part.partition(":")[2].split(",")
                    if kv.strip() and kv.split("=", 1)[0].strip() != "steps"]
            part = f"{method.name}:" + ",".join([f"steps={steps}", *kept])
        parts.append(part.strip())
    return "+".join(parts)


def recipe_slug(recipe: str) -> str:
    """A file-name-safe name for a recipe ('' is the baseline)."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", recipe) or "baseline"


# ---------------------------------------------------------------- calling a pipeline uniformly


class Caller:
    """Runs a pipeline on sample indices with per-sample seeds (so images do not depend on batching)."""

    def __init__(self, pipe, config: BenchConfig) -> None:
        from effdiff.zoo.data import NUM_CLASSES, eval_prompt

        self.pipe, self.config = pipe, config
        self.seeds = config.seed_list()
        self.digits = [i % NUM_CLASSES for i in range(config.samples)]
        self.prompts = [eval_prompt(d) for d in self.digits]
        self.class_conditional = "class_labels" in call_parameters(pipe)

    def _recipe_decides(self) -> set[str]:
        """The call arguments the applied recipe chooses itself (an explicit argument would override them)."""
        handle = self.pipe.__dict__.get("effdiff")
        methods = getattr(handle, "methods", ())
        decided = {name for m in methods for name in getattr(m, "decides", ())}
        # only a solver's steps are its speed-up; another method's `steps` (l2c's router) must match the bench's
        if any(m.family == "solver" and "steps" in getattr(m, "values", {}) for m in methods):
            decided.add("num_inference_steps")
        return decided

    def __call__(self, indices: Sequence[int]) -> torch.Tensor:
        gens = [torch.Generator().manual_seed(self.seeds[i]) for i in indices]
        decided = self._recipe_decides()
        kwargs: dict[str, Any] = {"generator": gens}
        if "guidance_scale" not in decided:
            kwargs["guidance_scale"] = self.config.guidance
        if "num_inference_steps" not in decided:
            kwargs["num_inference_steps"] = self.config.steps
        if self.class_conditional:
            out = self.pipe(class_labels=[self.digits[i] for i in indices], output_type="np", **kwargs)
        else:
            prompts = [self.prompts[i] for i in indices]
            out = self.pipe(prompts, negative_prompt=None, output_type="pt", **kwargs)
        return to_images(out)


# ---------------------------------------------------------------- recipes


class RecipeSwitch:
    """Applies / removes one recipe on a pipeline; the empty recipe is the untouched baseline."""

    def __init__(self, pipe, recipe: str, accelerate_fn: Callable) -> None:
        self.pipe, self.recipe, self.accelerate_fn = pipe, recipe, accelerate_fn
        self.active = False

    def apply(self) -> None:
        if self.recipe and not self.active:
            self.accelerate_fn(self.pipe, self.recipe)
            self.active = True

    def remove(self) -> None:
        if self.recipe and self.active:
            self.pipe.effdiff.remove()
            self.active = False

    def compiles(self) -> bool:
        """Whether the active recipe compiles the denoiser: its first call pays the compilation."""
        methods = getattr(getattr(self.pipe, "effdiff", None), "methods", ())
        return bool(self.recipe) and any(m.family == "compile" for m in methods)

    def describe_and_labels(self) -> tuple[str, list[str]]:
        """What the core says is active, and its honesty labels (simulated / trained)."""
        handle = getattr(self.pipe, "effdiff", None)
        if not self.recipe or handle is None:
            return "baseline", []
        describe = getattr(handle, "describe", None)
        text = str(describe()) if callable(describe) else ""
        labels = getattr(handle, "labels", None)
        labels = labels() if callable(labels) else labels
        if labels is None:
            labels = [w for w in ("simulated", "trained") if w in text.lower()]
        return text, sorted({str(label) for label in labels})


# ---------------------------------------------------------------- measurement of one recipe


class _Instrumented:
    """A timed callable that also records the stage split and peak memory of every call."""

    def __init__(self, pipe, fn: Callable[[], object], device: str) -> None:
        self.pipe, self.fn, self.device = pipe, fn, device
        self.stages: list[StageTimes] = []
        self.peaks: list[int] = []
        self.memory_method = ""

    def __call__(self) -> None:
        with PeakMemory(self.device) as mem, StageTimer(self.pipe) as timer:
            self.fn()
        self.stages.append(timer.times)
        self.peaks.append(mem.peak_bytes)
        self.memory_method = mem.method

    def stage_medians(self, skip: int, per: int) -> dict[str, float]:
        timed = self.stages[skip:] or self.stages
        return {k: statistics.median(getattr(s, k) for s in timed) / per
                for k in ("encode", "denoise", "decode", "other")}


def _time_recipe(switch: RecipeSwitch, base: _Instrumented, var: _Instrumented, config: BenchConfig,
                 apply_seconds: float) -> tuple[Timing, Timing, str, ForeignLoad]:
    """Baseline and variant timings: alternating when the recipe applies quickly, else in adjacent blocks."""
    with ForeignLoad() as load:
        if not switch.recipe:
            var_t = time_call(var, reps=config.reps, warmup=1)
            return var_t, var_t, "baseline", load
        if apply_seconds < SLOW_APPLY_S:
            base_t, var_t = time_alternating(base, var, reps=config.reps, warmup=1,
                                             enter_variant=switch.apply, exit_variant=switch.remove)
            return base_t, var_t, "alternating", load
        base_t = time_call(base, reps=config.reps, warmup=1)  # calibrating/training: not re-applied per rep
        switch.apply()
        try:
            var_t = time_call(var, reps=config.reps, warmup=1)
        finally:
            switch.remove()
        return base_t, var_t, "adjacent blocks", load


def measure_cost(pipe, caller: Caller, switch: RecipeSwitch, config: BenchConfig, device: str) -> dict[str, Any]:
    """FLOPs, NFE and the paired, alternating timing of one recipe against the baseline on the timed batch."""
    batch = list(range(config.timing_batch))
    start = time.perf_counter()
    switch.apply()
    apply_seconds = time.perf_counter() - start
    describe, labels = switch.describe_and_labels()
    compiles = switch.compiles()
    base = _Instrumented(pipe, lambda: caller(batch), device)
    var = _Instrumented(pipe, lambda: caller(batch), device)
    first_call_s = None
    if compiles:  # applied once: re-applying recompiles, and counting FLOPs first would time another graph
        switch.remove()  # nothing has run, so nothing was compiled yet
        # a fresh dynamo cache: an earlier compile recipe of this run left its graphs and its recompile count on
        # the same module's code, and `diffpruning+compile` after `compile` then ran eager with "compile s" 0.0
        torch._dynamo.reset()
        with ForeignLoad() as load:
            base_t = time_call(base, reps=config.reps, warmup=1)
            switch.apply()
            try:
                first_call_s = timed(lambda: caller(batch))  # the compiling call, reported apart
                var_t = time_call(var, reps=config.reps, warmup=0)
                with NFECounter(find_denoiser(pipe)) as nfe, count_flops() as flops:
                    caller(batch)
            finally:
                switch.remove()
        mode = "adjacent blocks, compiled once"
    else:
        try:  # FLOPs of the timed batch itself: a dynamic method decides per batch
            with NFECounter(find_denoiser(pipe)) as nfe, count_flops() as flops:
                caller(batch)
        finally:  # a refusal raised inside the call must not leave the pipeline accelerated for the next recipe
            switch.remove()
        base_t, var_t, mode, load = _time_recipe(switch, base, var, config, apply_seconds)
    per_image = var_t.median / len(batch)
    ratios = [b / v for b, v in zip(base_t.times, var_t.times, strict=True) if v > 0] if switch.recipe else [1.0]
    spread = (max(ratios) - min(ratios)) / statistics.median(ratios) if switch.recipe else var_t.spread
    flags = _noise_labels(spread, load.cores)
    return {
        "describe": describe, "labels": sorted({*labels, *flags}), "apply_seconds": apply_seconds,
        "first_call_s": first_call_s,  # compile recipes: the compiling call, apart from the steady state
        "compile_seconds": None if first_call_s is None else max(first_call_s - var_t.median, 0.0),
        "timing_mode": mode, "timing_batch": len(batch), "reps": config.reps, "times_s": var_t.times,
        "baseline_times_s": base_t.times, "time_spread": var_t.spread, "baseline_time_spread": base_t.spread,
        "speedup_reps": ratios, "speedup_spread": spread, "foreign_cores": load.cores, "loadavg": load.loadavg,
        "time_per_image_s": per_image, "baseline_time_per_image_s": base_t.median / len(batch),
        "speedup": _ratio(base_t, var_t), "nfe": nfe.calls,
        "stages_per_image_s": var.stage_medians(skip=1, per=len(batch)),
        "flops_per_image": flops.flops / len(batch), "macs_per_image": flops.macs / len(batch),
        "denoiser_flops_per_image": _denoiser_flops(pipe, flops) / len(batch),
        "attention_flops_per_image": flops.attention / len(batch),
        "gflops_achieved": achieved_gflops(flops.flops / len(batch), per_image),
        "peak_memory_mb": max(var.peaks[1:] or var.peaks) / 2**20, "memory_method": var.memory_method,
    }


def _add_labels(metrics: dict[str, Any], *labels: str) -> None:
    metrics["labels"] = sorted({*metrics.get("labels", ()), *labels})


def _noise_labels(spread: float, foreign_cores: float | None) -> list[str]:
    """``noisy`` when the repetitions disagree, ``loaded`` when other processes competed for the CPU."""
    labels = ["noisy"] if spread > NOISY_SPREAD else []
    if foreign_cores is not None and foreign_cores > LOADED_CORES:
        labels.append("loaded")
    return labels


def _ratio(base: Timing, var: Timing) -> float:
    return base.median / var.median if var.median > 0 else float("nan")


def _denoiser_flops(pipe, flops) -> int:
    return flops.by_root.get(type(find_denoiser(pipe)).__name__, 0)


def quality_samples(caller: Caller, switch: RecipeSwitch, config: BenchConfig) -> tuple[torch.Tensor, float]:
    """All quality samples, and the denoiser FLOPs per image they took (to hold against the timed batch's)."""
    switch.apply()
    try:
        with count_flops() as flops:
            chunks = [caller(range(i, min(i + config.gen_batch, config.samples)))
                      for i in range(0, config.samples, config.gen_batch)]
    finally:
        switch.remove()
    return torch.cat(chunks), _denoiser_flops(caller.pipe, flops) / config.samples


def _work_check(metrics: dict[str, Any], sample_flops: float) -> None:
    """Label a row whose timed batch and quality samples made the denoiser do different work (rule 7)."""
    timed = metrics.get("denoiser_flops_per_image") or 0.0
    metrics["denoiser_flops_per_image_samples"] = sample_flops
    mismatch = abs(timed - sample_flops) / sample_flops if sample_flops > 0 else 0.0
    metrics["work_mismatch"] = mismatch
    if mismatch > WORK_MISMATCH:
        _add_labels(metrics, "cost≠quality")
        metrics["cost_quality_note"] = (f"the denoiser ran {timed / 1e9:.3f} GFLOP per image on the timed batch and "
                                        f"{sample_flops / 1e9:.3f} on the quality samples: speed and quality describe "
                                        "different work")


# ---------------------------------------------------------------- the run


class _Judges:
    """Classifier and FID/KID judge, loaded once per run and only if a trained model needs them."""

    def __init__(self) -> None:
        self._judge = None
        self._reference = None

    @property
    def judge(self):
        if self._judge is None:
            from effdiff.eval.distribution import DistributionJudge

            self._judge = DistributionJudge.bundled()
        return self._judge

    @property
    def reference(self):
        """The held-out digits' feature statistics, for the bootstrap intervals."""
        if self._reference is None:
            from effdiff.eval.uncertainty import Reference

            self._reference = Reference.of(self.judge.reference_features)
        return self._reference


def _sample_scores(images: torch.Tensor, caller: Caller, judges: _Judges):
    """Features and per-sample correctness of one recipe's samples, for FID/KID and the bootstrap."""
    from effdiff.eval.accuracy import predict_digits
    from effdiff.eval.uncertainty import SampleScores

    judge = judges.judge
    correct = predict_digits(images, judge.features.classifier) == torch.as_tensor(caller.digits)
    return SampleScores(judge.features_of(images), correct, judges.reference)


def _quality(images: torch.Tensor, baseline: torch.Tensor, caller: Caller, judges: _Judges,
             floor: dict[str, float], baseline_scores) -> dict[str, Any]:
    from effdiff.eval.fidelity import fidelity
    from effdiff.eval.uncertainty import bootstrap

    is_baseline = images is baseline
    scores = baseline_scores if is_baseline else _sample_scores(images, caller, judges)
    dist = judges.judge.score_features(torch.from_numpy(scores.features).float())
    paired = None if is_baseline else baseline_scores
    return {
        **fidelity(images, baseline), "fid": dist["fid"], "kid": dist["kid"], "kid_std": dist["kid_std"],
        "fid_floor": floor["fid"], "kid_floor": floor["kid"], "n_samples": len(images),
        "n_reference": dist["n_reference"], "floor_size": floor["n_generated"],
        "prompt_accuracy": float(scores.correct.mean()), **bootstrap(scores, paired),
    }


def image_dir(out_dir: Path, run_id: str, model: str) -> Path:
    return Path(out_dir) / "images" / run_id / recipe_slug(model)


def store_location(out_dir: str | Path, store: str | None = None) -> str | Path:
    """Where a run's rows go: ``store`` (a database URL such as ``postgresql://…``, or a file) when given, else
    ``out_dir/results.sqlite``."""
    return store if store else Path(out_dir) / STORE_NAME


def run_bench(
    models: Sequence[str],
    recipes: Sequence[str],
    samples: int = 100,
    steps: int = 50,
    guidance: float = 4.0,
    seeds: Sequence[int] | None = None,
    out_dir: str | Path = "effdiff-bench",
    quick: bool = False,
    resume_run_id: str | None = None,
    *,
    loader: Callable[[str], Any] | None = None,
    accelerate_fn: Callable | None = None,
    timing_batch: int = 4,
    reps: int = 3,
    progress: bool = True,
    on_start: Callable[[str], None] | None = None,
    store: str | None = None,
    ray_address: str | None = None,
    until: Callable[[str, str, dict[str, Any]], bool] | None = None,
) -> str:
    """Benchmark ``recipes`` on ``models``; returns the run id (results in ``out_dir/results.sqlite``, or in
    ``store``, a database URL or file). ``ray_address``: measure on Ray ("local" starts one on this machine).

    Everything is validated (arguments, output folder, model names) before a run is registered;
    ``on_start`` hears the run id as soon as it exists, so an interrupted caller can say what to resume.
    ``until(model, recipe, metrics)``: after each stored row; True ends the run there, complete (``effdiff tune``
    confirms its candidates fastest first and stops at the first that meets its targets). Not with Ray.
    A run that fails before storing a row is deleted; otherwise it is left interrupted or failed.
    """
    config = make_config(models, recipes, samples, steps, guidance, seeds, quick, timing_batch, reps)
    out_dir = validate.output_dir(out_dir)
    if loader is None:
        from effdiff.zoo import check_model
        from effdiff.zoo import load as loader

        for model in config.models:
            check_model(model)
    if accelerate_fn is None and any(config.recipes):
        from effdiff.api import accelerate as accelerate_fn
    judges = _Judges()
    with ResultsStore(store_location(out_dir, store)) as store:
        if resume_run_id is not None:
            run_id = store.resume_run(resume_run_id, config_dict(config))
        else:
            run_id = store.start_run(config_dict(config))
        if on_start is not None:
            on_start(run_id)
        try:
            if ray_address is not None:  # Ray tasks (local: "local"), each measuring one recipe; rows written here
                from effdiff.bench.ray_runner import run_on_ray

                run_on_ray(config, store, run_id, out_dir, ray_address, progress=progress)
            else:
                _run_models(config, store, run_id, out_dir, loader, accelerate_fn, judges, progress, until)
        except _Enough:
            pass  # ``until`` was satisfied: the recipes after it were not needed
        except KeyboardInterrupt:
            store.set_state(run_id, "interrupted")
            raise
        except BaseException:
            if not store.delete_if_empty(run_id):
                store.set_state(run_id, "failed")
            raise
        store.set_state(run_id, "complete")
    return run_id


class _Enough(Exception):
    """Raised after a stored row that ``until`` accepted: the run ends there."""


def _run_models(config: BenchConfig, store: ResultsStore, run_id: str, out_dir: Path, loader, accelerate_fn,
                judges: _Judges, progress: bool, until: Callable[[str, str, dict[str, Any]], bool] | None) -> None:
    done = store.finished(run_id)
    if until is not None:
        _replay(store, run_id, config, until)
    todo = [(m, r) for m in config.models for r in config.recipes if (m, r) not in done]
    with _progress(progress) as bar:
        task = bar.add_task(f"run {run_id}", total=len(config.models) * len(config.recipes),
                            completed=len(config.models) * len(config.recipes) - len(todo))
        for model in config.models:
            recipes_left = [r for m, r in todo if m == model]
            if recipes_left:
                write = row_writer(store, run_id, model)
                if until is not None:
                    write = _stopping(write, model, until)
                _bench_model(model, recipes_left, config, loader, accelerate_fn, write,
                             stored_baseline_latency(store, run_id, model), image_dir(out_dir, run_id, model), judges,
                             lambda name: bar.update(task, description=name), lambda: bar.advance(task))


Write = Callable[[str, str, dict[str, Any], Environment], None]  # (recipe, metric set, metrics, environment)


def row_writer(store: ResultsStore, run_id: str, model: str) -> Write:
    """A ``Write`` that commits each row of ``model`` to ``store`` at once."""
    return lambda recipe, metric_set, metrics, env: store.write(run_id, model, recipe, metric_set, metrics, env)


def _replay(store: ResultsStore, run_id: str, config: BenchConfig,
            until: Callable[[str, str, dict[str, Any]], bool]) -> None:
    """A resumed run's stored rows through ``until`` first, in the run's order (the baseline before its recipes):
    the caller hears every row as in an uninterrupted run, and a row it accepts ends the run before any compute."""
    stored = {(r["model"], r["recipe"]): r["metrics"] for r in store.rows(run_id)}
    for model in config.models:
        for recipe in config.recipes:
            if (model, recipe) in stored and until(model, recipe, stored[(model, recipe)]):
                raise _Enough


def _stopping(write: Write, model: str, until: Callable[[str, str, dict[str, Any]], bool]) -> Write:
    """``write``, then end the run (``_Enough``) when ``until`` accepts the row just stored."""
    def write_then_check(recipe: str, metric_set: str, metrics: dict[str, Any], env: Environment) -> None:
        write(recipe, metric_set, metrics, env)
        if until(model, recipe, metrics):
            raise _Enough

    return write_then_check


def stored_baseline_latency(store: ResultsStore, run_id: str, model: str) -> float | None:
    """The baseline's seconds per image this run already stored for ``model`` (a resumed run's drift reference)."""
    row = next((r["metrics"] for r in store.rows(run_id) if r["model"] == model and not r["recipe"]), {})
    return row.get("time_per_image_s")


def config_dict(config: BenchConfig) -> dict[str, Any]:
    """The configuration as stored with a run (and hashed to match a resume to its start)."""
    data = asdict(config)
    data["seeds"] = list(config.seeds) if config.seeds is not None else f"range({config.samples})"
    return data


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    disable=not enabled)


def _bench_model(model: str, recipes: list[str], config: BenchConfig, loader, accelerate_fn, write: Write,
                 baseline_latency: float | None, folder: Path, judges: _Judges,
                 describe: Callable[[str], None], advance: Callable[[], None]) -> None:
    """Measure ``recipes`` on ``model`` (its baseline timed beside each), handing each row to ``write``."""
    pipe = loader(model)
    speed_only = bool(getattr(pipe, "effdiff_speed_only", False))
    device = str(getattr(pipe, "device", "cpu"))
    dtype = str(find_denoiser(pipe).dtype).replace("torch.", "")
    env = Environment.current(dtype=dtype, device=device)
    caller = Caller(pipe, config)
    folder.mkdir(parents=True, exist_ok=True)
    baseline_images = floor = baseline_scores = None
    if not speed_only:
        from effdiff.zoo.data import load_digits

        split = load_digits()
        floor = judges.judge.matched_floor(split.train_images, split.train_labels, caller.digits)
        baseline_images, baseline_flops = _baseline_images(folder, caller, pipe, accelerate_fn, config)
        baseline_scores = _sample_scores(baseline_images, caller, judges)
    for recipe in recipes:
        describe(f"{model} · {recipe or 'baseline'}: timing")
        switch = RecipeSwitch(pipe, recipe, accelerate_fn)
        metrics: dict[str, Any] = {"model": model, "recipe": recipe, "speed_only": speed_only,
                                   "steps": config.steps, "guidance": config.guidance}
        try:
            metrics.update(measure_cost(pipe, caller, switch, config, device))
        except RecipeError as refusal:  # e.g. a U-Net-only method on a DiT: recorded, not fatal
            metrics.update(labels=["refused"], refused=str(refusal))
            write(recipe, "refused", metrics, env)
            advance()
            continue
        if not recipe:
            baseline_latency = metrics["time_per_image_s"]
        elif baseline_latency:  # the baseline timed beside this recipe ran at another speed than the baseline row
            metrics["baseline_drift"] = metrics["baseline_time_per_image_s"] / baseline_latency - 1
            if abs(metrics["baseline_drift"]) > NOISY_SPREAD:  # its own paired speed-up holds; s/image across rows not
                _add_labels(metrics, "drift")
        if config.quick:
            _add_labels(metrics, "quick")
        if speed_only:
            _add_labels(metrics, "speed-only")
        else:
            describe(f"{model} · {recipe or 'baseline'}: {config.samples} samples")
            images, sample_flops = ((baseline_images, baseline_flops) if not recipe
                                    else quality_samples(caller, switch, config))
            _work_check(metrics, sample_flops)
            _save_images(folder, recipe, images)
            metrics.update(_quality(images, baseline_images, caller, judges, floor, baseline_scores))
        write(recipe, "speed-only" if speed_only else "full", metrics, env)
        advance()


def _baseline_images(folder: Path, caller: Caller, pipe, accelerate_fn,
                     config: BenchConfig) -> tuple[torch.Tensor, float]:
    """The baseline's samples and their FLOPs per image: from this run's saved file when resuming, else generated."""
    path = folder / f"{recipe_slug('')}.pt"
    if path.exists():
        saved = torch.load(path)
        if isinstance(saved, dict) and len(saved["images"]) == config.samples:
            return saved["images"], saved["flops_per_image"]
    images, flops = quality_samples(caller, RecipeSwitch(pipe, "", accelerate_fn), config)
    _save_tensor(folder / path.name, {"images": images, "flops_per_image": flops})
    return images, flops


def _save_images(folder: Path, recipe: str, images: torch.Tensor) -> None:
    """Samples as a tensor (for resume and re-scoring) and a grid PNG (for the report)."""
    from effdiff.bench.generate import save_grid

    slug = recipe_slug(recipe)
    if recipe:  # the baseline's file (with its FLOPs) is written as soon as its samples exist
        _save_tensor(folder / f"{slug}.pt", images)
    save_grid(images[:40], folder / f"{slug}.png", columns=10)


def _save_tensor(path: Path, value: Any) -> None:
    """Write through a temporary file, so a kill never leaves a half-written sample file to resume from."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(value, tmp)
    tmp.replace(path)
