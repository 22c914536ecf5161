"""``effdiff`` command line: bench, report, generate, calibrate, tune, methods, zoo prepare/train/eval.

User errors (bad recipe, unknown model, unreadable path, out-of-range value) print one clear line
and exit with status 2, never a traceback; argparse's own usage errors also exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

USAGE_ERROR = 2
DEFAULT_OUT = "effdiff-bench"


def _quiet_environment() -> None:
    """No hub access, and none of transformers' optional-backend chatter in a terminal tool."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    # diffusers imports torchao when it is installed; its CUDA-only extensions and enum registrations log on CPU
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _user_errors() -> tuple[type[BaseException], ...]:
    from effdiff.recipe import RecipeError
    from effdiff.zoo.checkpoints import CheckpointError
    from effdiff.zoo.load import ModelNotFoundError

    return RecipeError, ModelNotFoundError, CheckpointError, ValueError, FileNotFoundError


BENCH_DEFAULTS = {"samples": 100, "steps": 50, "guidance": 4.0, "timing_batch": 1}


def _bench_settings(args: argparse.Namespace) -> dict:
    """The bench's settings: given flags, else (with --resume) the stored run's, else the defaults."""
    from effdiff.bench import validate
    from effdiff.bench.defaults import default_models, default_recipes

    validate.output_dir(args.out)
    stored: dict = {}
    if args.resume:
        from effdiff.bench.runner import store_location
        from effdiff.bench.store import ResultsStore

        with ResultsStore(store_location(args.out, args.store), create=False) as store:
            store.check_run(args.resume)
            stored = store.run_config(args.resume)
        stored["recipes"] = [r for r in stored.get("recipes", []) if r]
    settings = {
        "models": args.model or stored.get("models") or default_models(),
        "recipes": args.recipes if args.recipes is not None else stored.get("recipes", default_recipes(args.full)),
        "quick": args.quick or bool(stored.get("quick")),
    }
    for key, default in BENCH_DEFAULTS.items():
        given = getattr(args, key)
        settings[key] = given if given is not None else stored.get(key, default)
    return settings


def _cmd_bench(args: argparse.Namespace) -> int:
    from effdiff.bench.report import report
    from effdiff.bench.runner import QUICK_SAMPLES, QUICK_STEPS, config_dict, make_config, run_bench, store_location
    from effdiff.bench.store import ResultsStore
    from effdiff.recipe import parse

    settings = _bench_settings(args)
    for recipe in settings["recipes"]:
        parse(recipe)  # unknown names and bad values fail here, before any model loads
    config = make_config(settings["models"], settings["recipes"], settings["samples"], settings["steps"],
                         settings["guidance"], None, settings["quick"], settings["timing_batch"])  # checks every value
    if args.resume:
        with ResultsStore(store_location(args.out, args.store), create=False) as store:
            store.check_resumable(args.resume, config_dict(config))
    from effdiff.zoo import check_model

    for model in settings["models"]:
        check_model(model)
    if settings["quick"]:
        print(f"quick: a smoke run ({QUICK_STEPS} steps, {QUICK_SAMPLES} samples, solver steps scaled by the same "
              "factor); its speed-ups and quality numbers check that everything runs, they do not rank methods")
    started: list[str] = []

    def announce(run_id: str) -> None:
        started.append(run_id)
        print(f"run {run_id}: results go to {store_location(args.out, args.store)}; after an interruption continue "
              f"it with `effdiff bench --resume {run_id} --out {args.out}`", flush=True)

    try:
        run_id = run_bench(settings["models"], settings["recipes"], samples=settings["samples"],
                           steps=settings["steps"], guidance=settings["guidance"], out_dir=args.out,
                           quick=settings["quick"], resume_run_id=args.resume,
                           timing_batch=settings["timing_batch"], on_start=announce, store=args.store,
                           ray_address=args.ray)
    except KeyboardInterrupt:
        if started:
            print(f"interrupted; the finished rows of run {started[0]} are kept: continue with "
                  f"`effdiff bench --resume {started[0]} --out {args.out}`", file=sys.stderr)
        else:
            print("interrupted before the run started; nothing was stored", file=sys.stderr)
        return 130
    html = report(args.out, run_id, store=args.store)
    print(f"run {run_id}: results in {store_location(args.out, args.store)}, report {html}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from effdiff.bench import validate
    from effdiff.bench.report import list_runs, report

    if args.list:
        list_runs(args.out, store=args.store)
        return 0
    if args.html:
        validate.output_file(args.html, (".html", ".htm"), "--html")
    print(f"report {report(args.out, args.run, args.html, figures=args.figure, tables=args.table, store=args.store)}")
    return 0


def _without_flag(argv: list[str], flag: str) -> list[str]:
    """``argv`` without ``flag VALUE`` / ``flag=VALUE``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out


def _cmd_generate(args: argparse.Namespace) -> int:
    from effdiff.bench import validate
    from effdiff.bench.generate import generate
    from effdiff.recipe import parse

    if args.steps is not None:
        validate.steps(args.steps)
    validate.guidance(args.guidance)
    validate.at_least(args.n, 1, "-n", "images to generate")
    validate.seed(args.seed)
    validate.output_file(args.out)
    parse(args.recipe)
    from effdiff.zoo import check_model

    check_model(args.model)
    from effdiff.distributed import init_from_env, launched, relaunch

    if args.nproc > 1 or launched():  # torchrun's ranks know their world from the environment
        from effdiff.registry import get_method

        if not any(get_method(m.name).family == "parallel" for m in parse(args.recipe)):
            raise ValueError(f"--nproc {args.nproc} needs a parallel method in the recipe (e.g. cfgparallel+...): "
                             "otherwise every rank would compute the same images")
        if not launched():
            return relaunch(args.nproc, _without_flag(sys.argv[1:], "--nproc"))
        rank, _ = init_from_env("cpu")
        if rank:
            generate(args.model, args.recipe, args.prompt, args.n, None, seed=args.seed, steps=args.steps,
                     guidance=args.guidance)
            return 0
    path = generate(args.model, args.recipe, args.prompt, args.n, args.out, seed=args.seed, steps=args.steps,
                    guidance=args.guidance)
    print(f"wrote {path}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from effdiff.bench import validate
    from effdiff.plan.estimate import estimates, fitted_constants, resolve, table

    validate.at_least(args.devices, 1, "--devices", "devices")
    validate.steps(args.steps)
    device, link = resolve(args.device, args.link)
    constants, errors = fitted_constants()
    rows = estimates(args.model, args.px, args.devices, device, link, constants, steps=args.steps,
                     warmup=args.warmup, dtype=args.dtype)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=1))
        return 0
    print(f"{args.model} at {args.px} px, {args.steps} steps, {args.dtype}, on {args.devices} × {device.name} "
          f"linked by {link.name}")
    print(f"kernel constants fitted to measured single-device steps: {constants.efficiency:.0%} of peak on "
          f"compute-bound kernels, {constants.floor_us:.1f} µs floor per kernel (fit errors "
          f"{', '.join(f'{e:+.1%}' for e in errors)}); assumed the same on {device.name}")
    print(table(rows))
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    import importlib

    from effdiff.errors import RecipeError
    from effdiff.registry import get_method, tunable_methods
    from effdiff.tune.targets import parse_target

    _, target = parse_target(args.target)  # a malformed target fails before any model loads
    method = get_method(args.method)  # an unknown name: the valid ones and a did-you-mean
    if not method.tuner:
        raise RecipeError(f"{method.name} has nothing to calibrate; methods with a tuner: "
                          f"{', '.join(tunable_methods())}")
    if args.steps < 3 or args.prompts < 1:
        raise ValueError(f"--steps must be >= 3 and --prompts >= 1, got {args.steps} and {args.prompts}")
    from effdiff.calling import conditions_for
    from effdiff.zoo.load import load

    tuner = importlib.import_module(method.tuner)
    pipe = load(args.model)
    pipe.set_progress_bar_config(disable=True)
    prompts = conditions_for(pipe, args.prompts, "calibration")  # never the evaluation prompts
    print(tuner.run(pipe, args.model, prompts, args.steps, args.guidance, target, args.seed,
                    Path(args.out) if args.out else None))
    return 0


def parse_budget(text: str) -> float:
    """``"30m"``, ``"90s"``, ``"1.5h"`` or plain seconds -> seconds (positive)."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", text.lower())
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive duration such as 30m, 90s or 1h, got {text!r}")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def _cmd_tune(args: argparse.Namespace) -> int:
    from effdiff.tune.run import TuneSettings, tune

    settings = TuneSettings(
        model=args.model, targets=tuple(args.target), budget_s=args.budget, trials=args.trials,
        proxy_samples=args.proxy_samples, confirm_samples=args.confirm_samples, confirm_top=args.confirm_top,
        refine_samples=args.refine_samples, refine_trials=args.refine_trials, steps=args.steps,
        guidance=args.guidance, timing_batch=args.timing_batch, sampler=args.sampler,
        speed=args.speed, seed=args.seed, include=tuple(args.include or ()), exclude=tuple(args.exclude or ()),
        calibrate=tuple(args.calibrate or ()), device=args.device, out_dir=args.out, storage=args.storage,
        study=args.study, name=args.name)
    result = tune(settings)
    print(f"use it: effdiff.accelerate(pipe, 'tuned:{result.name}')  or  effdiff generate --model {args.model} "
          f"--recipe tuned:{result.name}")
    if result.report is not None:
        print(f"report: {result.report}")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from effdiff.catalogue import catalogue_rows
    from effdiff.registry import methods_rows

    console = Console()
    table = Table(title="Registered methods", show_lines=False)
    for column in ("name", "family", "backbones", "params", "paper", "arxiv"):
        table.add_column(column, overflow="fold")
    for row in methods_rows():
        if args.family and row["family"] != args.family:
            continue
        table.add_row(*(row[c] for c in ("name", "family", "backbones", "params", "paper", "arxiv")))
    console.print(table)
    if args.no_catalogue:
        return 0
    rows = catalogue_rows(status=args.status, family=args.family)
    catalogue = Table(title=f"Catalogue of the seed papers ({len(rows)} entries)")
    for column in ("title", "arxiv", "family", "backbone", "status", "methods / reason"):
        catalogue.add_column(column, overflow="fold")
    for row in rows:
        catalogue.add_row(row["title"], row["arxiv"], row["family"], row["backbone"], row["status"],
                          row["methods"] or row["reason"])
    console.print(catalogue)
    return 0


def _cmd_zoo_prepare(args: argparse.Namespace) -> int:
    from effdiff.zoo.captions import caption_states
    from effdiff.zoo.data import cache_dir, load_digits

    split = load_digits()
    states = caption_states()
    print(f"{len(split.train_images)} train / {len(split.heldout_images)} held-out digits and "
          f"{len(states)} caption encodings cached in {cache_dir()}")
    return 0


def _cmd_zoo_train(args: argparse.Namespace) -> int:
    from effdiff.zoo.train import train_from_arguments

    print(f"exported {train_from_arguments(args)}")
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from effdiff.distill.trainer import distill_from_arguments

    print(f"exported {distill_from_arguments(args)}")
    return 0


def _cmd_compress(args: argparse.Namespace) -> int:
    from effdiff.compress.trainer import compress_from_arguments

    print(f"exported {compress_from_arguments(args)}")
    return 0


def _cmd_zoo_eval(args: argparse.Namespace) -> int:
    import torch

    from effdiff.zoo.evaluate import generate_eval_samples, meets_bar, score_samples
    from effdiff.zoo.load import load

    if args.samples_file:
        saved = torch.load(args.samples_file)
        images01, digits = saved["images"].float() / 255, saved["labels"]
    else:
        pipe = load(args.model).to(args.device)
        images, digits = generate_eval_samples(pipe, per_digit=args.per_digit, steps=args.steps,
                                               guidance=args.guidance, seed=args.seed, batch=args.batch)
        images01 = (images + 1) / 2
    scores = score_samples(images01, digits)
    print(f"{args.model}: {scores['n']} samples  prompt accuracy {scores['prompt_accuracy']:.1%}  "
          f"FID {scores['fid']:.3f} (real-vs-real floor {scores['floor_fid']:.3f}, bar ≤ {3 * scores['floor_fid']:.3f})"
          f"  KID {scores['kid']:.4f} (floor {scores['floor_kid']:.4f})  "
          f"{'meets' if meets_bar(scores) else 'MISSES'} the bar")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from effdiff.compress.trainer import add_compress_arguments
    from effdiff.distill.trainer import add_distill_arguments
    from effdiff.registry import FAMILIES
    from effdiff.zoo.train import add_train_arguments

    parser = argparse.ArgumentParser(prog="effdiff", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="benchmark recipes on models (default: bundled tiny-sd, tiny-dit)")
    bench.add_argument("--model", action="append", help="model name or path (repeatable)")
    bench.add_argument("--recipes", nargs="+", help="recipes to run (default: one per method family + stacks)")
    bench.add_argument("--full", action="store_true",
                       help="every curated recipe, not only each family's best (about twice as long)")
    bench.add_argument("--samples", type=int, help="images per recipe for quality metrics (default 100)")
    bench.add_argument("--steps", type=int, help="baseline DDIM steps (default 50)")
    bench.add_argument("--guidance", type=float, help="classifier-free guidance scale (default 4)")
    bench.add_argument("--timing-batch", type=int,
                       help="images per timed call (default 1: the latency of one image)")
    bench.add_argument("--quick", action="store_true", help="few steps and samples: a smoke run")
    bench.add_argument("--out", default=DEFAULT_OUT, help="results folder (SQLite store, images, report)")
    bench.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                       help="run each (model, recipe) as a Ray task: a local Ray by default, or a cluster's address")
    bench.add_argument("--store", help="a database URL (postgresql+psycopg://user@host/db) for the rows instead of "
                                       "OUT/results.sqlite: many machines' runs in one place")
    bench.add_argument("--resume", metavar="RUN_ID",
                       help="continue an interrupted run with its stored settings (its id is printed when it starts; "
                            "`effdiff report --list` lists them)")
    bench.set_defaults(func=_cmd_bench)

    rep = sub.add_parser("report", help="print a stored run and write its HTML report")
    rep.add_argument("--out", default=DEFAULT_OUT)
    rep.add_argument("--store", help="read the rows from this database URL instead of OUT/results.sqlite")
    rep.add_argument("--run", help="run id (default: the latest run that stored results)")
    rep.add_argument("--list", action="store_true", help="list the stored runs with their state, then stop")
    rep.add_argument("--html", help="HTML path (default: OUT/report-RUN.html)")
    rep.add_argument("--figure", action="append", default=[], metavar="PNG",
                     help="also embed this plot (e.g. a benchmark script's); repeatable")
    rep.add_argument("--table", action="append", default=[], metavar="JSON",
                     help="also show this benchmark result's rows (e.g. benchmarks/results/distill_quality.json); "
                          "repeatable")
    rep.set_defaults(func=_cmd_report)

    gen = sub.add_parser("generate", help="generate an image grid with a recipe")
    gen.add_argument("--model", default="tiny-sd")
    gen.add_argument("--recipe", default="")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("-n", type=int, default=16)
    gen.add_argument("--out", default="grid.png")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int,
                     help="denoising steps (default: the recipe's solver steps, else the pipeline's 50)")
    gen.add_argument("--guidance", type=float, default=4.0)
    gen.add_argument("--nproc", type=int, default=1,
                     help="ranks on this machine (torchrun, gloo on the CPU); the recipe needs a parallel method")
    gen.set_defaults(func=_cmd_generate)

    cal = sub.add_parser("calibrate", help="fit a caching method's change model and threshold for a quality target")
    cal.add_argument("--model", required=True, help="model name or path")
    cal.add_argument("--method", required=True, help="a method that declares a tuner (teacache, l2c)")
    cal.add_argument("--target", default="psnr>=30", help="quality target vs the baseline images (psnr>=X dB)")
    cal.add_argument("--steps", type=int, default=50)
    cal.add_argument("--prompts", type=int, default=2, help="calibration prompts (one image each)")
    cal.add_argument("--guidance", type=float, default=4.0)
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--out", help="JSON path (default: teacache-MODEL.json in $EFFDIFF_CACHE_DIR or ~/.cache/effdiff)")
    cal.set_defaults(func=_cmd_calibrate)

    dist = sub.add_parser("distill", help="train a student: lcm, guidance-distill, progressive, rectflow or "
                                          "dmd, LoRA or full (checkpoints, --resume)")
    add_distill_arguments(dist)
    dist.set_defaults(func=_cmd_distill)

    comp = sub.add_parser("compress", help="prune a model to a MAC budget and finetune it: diffpruning "
                                           "(checkpoints, --resume)")
    add_compress_arguments(comp)
    comp.set_defaults(func=_cmd_compress)

    tune = sub.add_parser("tune", help="find the fastest stack that keeps quality targets on a model (Optuna), "
                                       "confirm it on many samples, save it as tuned:NAME")
    tune.add_argument("--model", required=True, help="model name or path")
    tune.add_argument("--target", action="append", required=True,
                      help="psnr>=30, ssim>=0.9, fid<=+10%%, kid<=+0.001, acc>=99 or acc>=-1 (repeatable; a sign "
                           "means relative to the baseline)")
    tune.add_argument("--budget", type=parse_budget, default=1800.0, help="search time, e.g. 30m (default), 2h")
    tune.add_argument("--trials", type=int, help="cap on the study's trials over every resume")
    tune.add_argument("--proxy-samples", type=int, default=8, help="images per trial (default 8)")
    tune.add_argument("--confirm-samples", type=int, default=1000,
                      help="images per candidate in the confirmation (default 1000)")
    tune.add_argument("--confirm-top", type=int, default=8,
                      help="at most this many proxy-front stacks confirmed, fastest first, until one meets the "
                           "targets (default 8)")
    tune.add_argument("--refine-samples", type=int, default=0,
                      help="then search the confirmed stack's knobs for speed and FID on this many samples, and "
                           "confirm the faster ones (default 0: no refinement; 200 is a good start)")
    tune.add_argument("--refine-trials", type=int, default=24, help="trials of the refinement (default 24)")
    tune.add_argument("--steps", type=int, default=50, help="baseline DDIM steps (default 50)")
    tune.add_argument("--guidance", type=float, default=4.0)
    tune.add_argument("--timing-batch", type=int, default=2, help="images per timed call in a trial (default 2)")
    tune.add_argument("--sampler", choices=("tpe", "nsga2"), default="tpe")
    tune.add_argument("--speed", choices=("time", "flops"), default="time",
                      help="the search's speed objective: paired wall clock (default) or the denoiser's FLOPs ratio "
                           "(no timing noise; the confirmation always times)")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--include", action="append", help="a method or family left out by default (compile)")
    tune.add_argument("--exclude", action="append", help="a method or family not to try")
    tune.add_argument("--calibrate", action="append", help="run this method's tuner first (teacache, l2c)")
    tune.add_argument("--device", default="cpu")
    tune.add_argument("--out", default="effdiff-tune", help="study, confirmation run and report folder")
    tune.add_argument("--storage", help="Optuna storage: a file (SQLite) or a database URL shared by machines")
    tune.add_argument("--study", help="study name (default: from the model and settings, so a rerun resumes it)")
    tune.add_argument("--name", help="save as tuned:NAME (default: the study name)")
    tune.set_defaults(func=_cmd_tune)

    plan = sub.add_parser("plan", help="estimate parallel methods' latency on N devices (a calibrated cost model)")
    plan.add_argument("--model", default="sdxl-arch", help="sd15-arch, sdxl-arch, pixart-alpha-arch or flux-dev-arch")
    plan.add_argument("--px", type=int, default=1024, help="image side in pixels (multiple of 64)")
    plan.add_argument("--devices", type=int, default=8)
    plan.add_argument("--device", default="a100", help="a100, h100 or h200")
    plan.add_argument("--link", default="nvlink", help="nvlink (the device's generation), pcie4, pcie5, ethernet")
    plan.add_argument("--steps", type=int, default=50)
    plan.add_argument("--warmup", type=int, default=4, help="DistriFusion's synchronous steps after the first")
    plan.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    plan.add_argument("--json", action="store_true", help="print the estimates as JSON")
    plan.set_defaults(func=_cmd_plan)

    methods = sub.add_parser("methods", help="the registry and the catalogue of seed papers")
    methods.add_argument("--family", choices=FAMILIES)
    methods.add_argument("--status", choices=("implemented", "planned", "out of scope"))
    methods.add_argument("--no-catalogue", action="store_true")
    methods.set_defaults(func=_cmd_methods)

    zoo = sub.add_parser("zoo", help="the bundled models: prepare data, train, evaluate")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    zoo_sub.add_parser("prepare", help="cache the MNIST split and caption encodings").set_defaults(
        func=_cmd_zoo_prepare)
    train = zoo_sub.add_parser("train", help="train a bundled model (checkpoints, --resume, EMA)")
    add_train_arguments(train)
    train.set_defaults(func=_cmd_zoo_train)
    evaluate = zoo_sub.add_parser("eval", help="the quality bar: accuracy, FID/KID vs held-out digits")
    evaluate.add_argument("model", help="tiny-sd, tiny-dit or a trained export folder")
    evaluate.add_argument("--per-digit", type=int, default=100)
    evaluate.add_argument("--steps", type=int, default=50)
    evaluate.add_argument("--guidance", type=float, default=4.0)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--batch", type=int, default=200)
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--samples-file", type=Path, help="score samples saved by tools/gpu_sample.py")
    evaluate.set_defaults(func=_cmd_zoo_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_environment()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as exc:
        print(f"effdiff {args.command}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except OSError as exc:  # an output path that became unwritable after validation (disk full, removed folder)
        from effdiff.bench.validate import os_error_sentence

        print(f"effdiff {args.command}: error: {os_error_sentence(exc)}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
