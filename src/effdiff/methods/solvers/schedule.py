"""Optimised step schedules: choose *which* timesteps a small-NFE solver visits.

The schedule is optimised once per (model, scheduler, steps, guidance), saved to a JSON file and
reused, then applied through the scheduler's own ``set_timesteps(timesteps=...)``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from effdiff.adapters import find_denoiser
from effdiff.calling import call_with
from effdiff.errors import RecipeError
from effdiff.methods.solvers import klub
from effdiff.methods.solvers.schedulers import refuse_flow_matching
from effdiff.patches import PatchLog
from effdiff.recording import Trajectory
from effdiff.registry import FAMILIES, Method, Paper, Param

AYS = Paper("Align Your Steps: Optimizing Sampling Schedules in Diffusion Models", "2404.14507", "ICML 2024")
CANDIDATES = 11  # timesteps tried per position and sweep, the current one included (the paper's Alg. 1)


def accepts_timesteps(scheduler: Any) -> bool:
    """Whether ``scheduler.set_timesteps`` takes a custom ``timesteps=`` list (DDIM, PNDM do not)."""
    return "timesteps" in inspect.signature(type(scheduler).set_timesteps).parameters


def cache_path(explicit: str = "") -> Path:
    if explicit:
        return Path(explicit)
    root = os.environ.get("EFFDIFF_CACHE_DIR") or Path.home() / ".cache" / "effdiff"
    return Path(root) / "schedules.json"


def model_fingerprint(model: torch.nn.Module) -> str:
    """Cheap identity of a denoiser's weights: config plus shape and a slice sum of every tensor.

    The config's private keys (``_name_or_path``, ``_diffusers_version``…) are left out: they say where and with
    what the weights were loaded, not what they are, and a checkout in another folder must match the same record."""
    digest = hashlib.sha1(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        public = {key: value for key, value in dict(config).items() if not key.startswith("_")}
        digest.update(json.dumps(public, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        head = tensor.detach().flatten()[:512].double().sum().item() if tensor.numel() else 0.0
        digest.update(f"{name}:{tuple(tensor.shape)}:{head:.10e}".encode())
    return digest.hexdigest()[:16]


class _TimestepOverride:
    """Redirects ``scheduler.set_timesteps(n)`` to a custom list while one is set for that ``n``."""

    def __init__(self, scheduler: Any, patches: PatchLog) -> None:
        self.scheduler = scheduler
        self.schedule: list[int] | None = None
        self.warned = False
        self._inner = patches.attr(scheduler, "set_timesteps", self._set_timesteps)

    def _set_timesteps(self, num_inference_steps: int | None = None, device: Any = None,
                       **kwargs: Any) -> Any:
        schedule = self.schedule
        if schedule is None or kwargs.get("timesteps") is not None or kwargs.get("sigmas") is not None:
            return self._inner(num_inference_steps, device=device, **kwargs)
        if num_inference_steps != len(schedule):
            if not self.warned:
                warnings.warn(f"ays: the schedule was optimised for {len(schedule)} steps, this call asks "
                              f"for {num_inference_steps}; using the default spacing", stacklevel=3)
                self.warned = True
            return self._inner(num_inference_steps, device=device, **kwargs)
        kwargs.pop("timesteps", None)
        return self._inner(device=device, timesteps=list(schedule), **kwargs)


def sample(pipe: Any, prompts: list[Any], steps: int, guidance: float, seed: int) -> torch.Tensor:
    """One seeded call over ``prompts`` (class labels 0..n-1 on a class-conditional pipeline), as float images."""
    out = call_with(pipe, prompts, num_inference_steps=steps, guidance_scale=guidance,
                    generator=torch.Generator("cpu").manual_seed(seed), output_type="pt", return_dict=False)[0]
    return torch.as_tensor(out).float()


def optimise_schedule(pipe: Any, override: _TimestepOverride, steps: int, ref_steps: int, prompts: list[str],
                      guidance: float, rounds: int, budget_s: float, objective: str = "klub", samples: int = 4,
                      seed: int = 0) -> dict[str, Any]:
    """The best ``steps``-step integer schedule for the pipeline's solver, by ``objective``.

    Both objectives start from the solver's default spacing and are checked against a ``ref_steps``-step
    reference from the same noise (the mean squared error of the coarse samples): ``klub`` minimises the paper's
    KL upper bound (``klub.py``) and keeps, of its sweeps, the schedule closest to the reference (the paper's
    early stopping); ``trajectory`` descends on that distance itself.
    """
    scheduler = override.scheduler
    override.schedule = None
    model = find_denoiser(pipe)
    with Trajectory(model, last_only=True) as recorded:
        reference = sample(pipe, prompts, ref_steps, guidance, seed)
    override._inner(steps)
    schedule = [int(t) for t in scheduler.timesteps.tolist()]
    evaluations = 0

    def loss(candidate: list[int]) -> float:
        nonlocal evaluations
        evaluations += 1
        override.schedule = candidate
        return float(torch.mean((sample(pipe, prompts, steps, guidance, seed) - reference) ** 2))

    try:
        if objective == "klub":
            levels = klub.NoiseLevels.of(scheduler)
            call = recorded.calls[-1]
            denoiser = klub.Denoiser(model, call, levels, scheduler.config.get("prediction_type", "epsilon"))
            last = levels.sigma(round(call.timestep))
            x0 = denoiser(call.sample().double() * math.sqrt(1 + last**2),
                          torch.full((call.target.shape[0],), last, dtype=torch.float64))
            record = klub.optimise(denoiser, x0, levels, schedule, rounds, CANDIDATES, samples, seed, budget_s, loss)
            record["klub_default"] = klub.schedule_klub(denoiser, x0, levels, schedule, record["data_scale"],
                                                        samples, seed)
            record["klub_optimised"] = klub.schedule_klub(denoiser, x0, levels, record["timesteps"],
                                                          record["data_scale"], samples, seed)
        else:
            record = descend(schedule, loss, int(scheduler.config.num_train_timesteps) - 1, rounds, budget_s)
    finally:
        override.schedule = None
    return {**record, "objective": objective, "pipeline_calls": evaluations}


def descend(schedule: list[int], loss: Callable[[list[int]], float], top: int, rounds: int,
            budget_s: float) -> dict[str, Any]:
    """Coordinate descent on integer timesteps: each in turn moves by +-delta (the schedule stays strictly
    decreasing) where that lowers ``loss``; delta halves every round."""
    start = time.perf_counter()
    initial = best = loss(schedule)
    delta = max(1, (top + 1) // (2 * len(schedule)))
    for _ in range(rounds):
        for i in range(len(schedule)):
            for move in (delta, -delta):
                candidate = list(schedule)
                candidate[i] += move
                upper = top if i == 0 else candidate[i - 1] - 1
                lower = 0 if i == len(candidate) - 1 else candidate[i + 1] + 1
                if not lower <= candidate[i] <= upper:
                    continue
                value = loss(candidate)
                if value < best:
                    best, schedule = value, candidate
                    break
            if time.perf_counter() - start > budget_s:
                break
        if time.perf_counter() - start > budget_s or delta == 1:
            break
        delta = max(1, delta // 2)
    return {"timesteps": schedule, "loss_default": initial, "loss_optimised": best,
            "seconds": round(time.perf_counter() - start, 2)}


class AlignYourSteps(Method):
    """Optimised sampling schedule for a given solver and step count.

    Paper: Sabour, Fidler, Kreis, "Align Your Steps: Optimizing Sampling Schedules in Diffusion
    Models" (arXiv 2404.14507, ICML 2024). ``objective=klub`` (default) is the paper's: the KL-divergence
    upper bound of the discretised SDE, importance-sampled per step and minimised by coordinate search over
    the interior timesteps (``klub.py``), with early stopping on the distance to a fine-step reference from
    the same noise (the paper stops on a perceptual check). Two deviations, both because a pipeline carries no
    dataset and users ask for a step count: ``x0`` is the model's own fine-step samples, and the schedule is
    optimised at the requested step count directly (the paper optimises 10 steps, then subdivides).
    ``objective=trajectory`` instead descends on that distance itself (effdiff's earlier variant).
    If the pipeline's scheduler cannot take custom timesteps (DDIM, PNDM), it is swapped for
    DPM-Solver++ 2M; a solver earlier in the recipe that accepts them is kept.
    """

    name = "ays"
    family = "solver"
    after = ("solver",)
    before = tuple(f for f in FAMILIES if f != "solver")
    exclusive = ("step schedule",)
    tuner = "effdiff.tune.ays"  # `effdiff tune --calibrate ays` optimises the searched step counts' schedules first
    tuned_first = True
    paper = AYS
    summary = "optimised timesteps for a solver and NFE, cached in a JSON file"
    params = {
        "steps": Param(int, 10, 2, 200, help="number of steps the schedule is optimised for", search=(5, 8, 10)),
        "ref_steps": Param(int, 100, 4, 2000, help="steps of the fine reference trajectory"),
        "seeds": Param(int, 4, 1, 64, help="calibration samples"),
        "objective": Param(str, "klub", choices=("klub", "trajectory"),
                           help="klub: the paper's KL upper bound; trajectory: distance to the fine reference"),
        "samples": Param(int, 4, 1, 256, help="klub: Monte-Carlo draws per step interval (each x the seeds)"),
        "rounds": Param(int, 4, 1, 50, help="sweeps over the timesteps (trajectory: delta halves each round)"),
        "budget_s": Param(float, 110.0, 1.0, 7200.0, help="time limit of the optimisation"),
        "guidance": Param(float, 4.0, 0.0, 50.0, help="guidance scale used for calibration"),
        "prompts": Param(str, "", help="'|'-separated calibration prompts (default: per pipeline)"),
        "cache": Param(str, "", help="JSON file of saved schedules (default ~/.cache/effdiff)"),
    }

    def apply(self, pipe: Any, ctx: Any) -> None:
        refuse_flow_matching(self.name, pipe)
        if not accepts_timesteps(pipe.scheduler):
            from diffusers import DPMSolverMultistepScheduler

            self.patches.attr(pipe, "scheduler", DPMSolverMultistepScheduler.from_config(pipe.scheduler.config))
        self._override = _TimestepOverride(pipe.scheduler, self.patches)
        try:
            self.record = self._schedule(pipe)
            self._override._inner(timesteps=self.record["timesteps"])  # fail now, not mid-call
        except ValueError as exc:
            name = type(pipe.scheduler).__name__
            raise RecipeError(f"ays cannot set custom timesteps on {name}: {exc}") from None
        self._override.schedule = list(self.record["timesteps"])

    def _prompts(self, pipe: Any) -> list[str]:
        if self.values["prompts"]:
            base = [p.strip() for p in self.values["prompts"].split("|")]
        elif callable(getattr(pipe, "effdiff_prompts", None)):
            base = list(pipe.effdiff_prompts("eval", self.values["seeds"]))
        else:
            base = [""]
        return [base[i % len(base)] for i in range(self.values["seeds"])]

    def key(self, pipe: Any) -> str:
        v = self.values
        return (f"{model_fingerprint(find_denoiser(pipe))}|{type(pipe.scheduler).__name__}|"
                f"{json.dumps(dict(pipe.scheduler.config), sort_keys=True, default=str)}|steps={v['steps']}|"
                f"ref={v['ref_steps']}|g={v['guidance']}|seeds={v['seeds']}|prompts={v['prompts']}|"
                f"objective={v['objective']}|samples={v['samples']}|rounds={v['rounds']}")

    def _schedule(self, pipe: Any) -> dict[str, Any]:
        path = cache_path(self.values["cache"])
        key = hashlib.sha1(self.key(pipe).encode()).hexdigest()
        store = json.loads(path.read_text()) if path.exists() else {}
        if key in store:
            return store[key]
        v = self.values
        record = optimise_schedule(pipe, self._override, v["steps"], v["ref_steps"], self._prompts(pipe),
                                   v["guidance"], v["rounds"], v["budget_s"], v["objective"], v["samples"])
        record["scheduler"] = type(pipe.scheduler).__name__
        store = json.loads(path.read_text()) if path.exists() else {}
        store[key] = record
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(store, indent=1))
        tmp.replace(path)
        return record

    def prepare_call(self, arguments: dict[str, Any], explicit: frozenset[str]) -> None:
        if "num_inference_steps" not in explicit:
            arguments["num_inference_steps"] = self.values["steps"]

    def describe(self) -> str:
        record = getattr(self, "record", None)
        base = super().describe()
        return base if record is None else f"{base} timesteps={record['timesteps']}"
