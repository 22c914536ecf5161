"""Learning-to-Cache: a router learned on the model picks, per step, the layers that reuse the last full step's output.

The router is trained once per model, scheduler and step count (a few minutes on a CPU for the bundled
models), saved as JSON (``l2c-MODEL-STEPS.json`` in ``$EFFDIFF_CACHE_DIR`` or ``~/.cache/effdiff``, or the
``router=`` path) and reused by later runs; ``effdiff calibrate --method l2c`` (re)trains it and picks the
cached fraction for a PSNR target.
"""

from __future__ import annotations

import json
import random
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from effdiff.context import StepContext
from effdiff.methods.cache.base import (
    CacheMethod,
    Forward,
    first_tensor,
    refuse,
    refuse_chunked_feed_forward,
    token_shape,
)
from effdiff.methods.cache.teacache import calibration_file
from effdiff.methods.solvers.schedule import model_fingerprint, sample
from effdiff.registry import Paper, Param, RecipeError

L2C = Paper("Learning-to-Cache: Accelerating Diffusion Transformer via Layer Caching", "2406.01733", "NeurIPS 2024")
L1_WEIGHT = 0.02  # weight of the mean router score against the relative output error (the paper's L1 term)
LEARNING_RATE = 0.1
RECORD_KEYS = ("steps", "period", "scheduler", "timesteps", "layers", "scores")


def router_file(model_name: str, steps: int, period: int = 2) -> Path:
    """Default router path: ``l2c-MODEL-STEPS.json`` beside teacache's calibrations (``-pN`` for period N != 2)."""
    teacache = calibration_file(model_name)
    model = teacache.stem.removeprefix("teacache-")
    return teacache.with_name(f"l2c-{model}-{steps}{'' if period == 2 else f'-p{period}'}.json")


def cache_layers(adapter: Any) -> list[tuple[str, nn.Module]]:
    """The attention (self and cross) and feed-forward layers, in module order: the layers L2C routes."""
    from diffusers.models.attention import FeedForward

    attention = {id(m) for _, m in adapter.attention()}
    return [(n, m) for n, m in adapter.model.named_modules() if id(m) in attention or isinstance(m, FeedForward)]


def cache_plan(scores: list[list[float] | None], fraction: float) -> tuple[list[frozenset[int]], float | None]:
    """Per step, the layers served from cache, and the router threshold that yields them.

    The lowest-scored (step, layer) slots are cached until ``fraction`` of *all* slots (full steps
    included) is reached: thresholding the learned scores to a target number of cached layers.
    Ties go to the earlier step and layer, so a router always gives the same plan.
    """
    layers = max((len(s) for s in scores if s is not None), default=0)
    slots = sorted((score, step, layer) for step, row in enumerate(scores) if row is not None
                   for layer, score in enumerate(row))
    chosen = slots[:min(round(fraction * len(scores) * layers), len(slots))]
    plan: list[set[int]] = [set() for _ in scores]
    for _, step, layer in chosen:
        plan[step].add(layer)
    return [frozenset(p) for p in plan], (chosen[-1][0] if chosen else None)


def _blend(beta: torch.Tensor, fresh: Any, kept: Any) -> Any:
    """``beta * fresh + (1 - beta) * kept`` for a layer output (a tensor or a tuple of them)."""
    if isinstance(fresh, tuple):
        return tuple(_blend(beta, f, k) for f, k in zip(fresh, kept, strict=True))
    return beta * fresh + (1 - beta) * kept if isinstance(fresh, torch.Tensor) else fresh


class LearningToCache(CacheMethod):
    """Layer caching with a per-step, per-layer router learned on the model.

    Paper: Ma, Fang, Mi, Wang, "Learning-to-Cache: Accelerating Diffusion Transformer via Layer
    Caching" (arXiv 2406.01733, NeurIPS 2024). Every ``period``-th step (paper: every other) runs in full
    and keeps each attention and feed-forward layer's output; at the steps in between a router score
    ``beta[step, layer]`` in (0, 1) decides whether the layer runs or returns the kept output. Training
    (the paper's objective): the model's own sampling trajectories (DDIM or the pipeline's solver, CFG,
    ``samples`` prompts) are recorded; for a cache step, the layer outputs of its full step are kept,
    every layer's output becomes ``beta * fresh + (1 - beta) * kept`` and the scores (sigmoids of free
    logits, the model frozen) minimise the relative squared error to the full model's output plus
    ``L1_WEIGHT`` times the mean score, which pushes layers to cache. At inference the scores are
    thresholded so that ``fraction`` of all (step, layer) slots are cached, the lowest-scored first.
    The router belongs to one step count and scheduler: another step count, scheduler or set of
    timesteps is refused. Routes the same layers as FORA, so it runs on U-Net transformer blocks too.
    ``fraction=0`` caches nothing: bit-identical to the baseline.
    """

    name = "l2c"
    exclusive = ("layer outputs",)
    tuner = "effdiff.tune.l2c"
    tuned_first = True  # each trial would train its own router
    examples = {"noop": "l2c:steps=3,samples=1,epochs=2,fraction=0",
                "skips": "l2c:steps=3,samples=1,epochs=2,fraction=0.3"}
    paper = L2C
    summary = "learned per-step, per-layer router: which attention/MLP outputs to reuse (trained, saved, reused)"
    params = {
        "fraction": Param(float, 0.4, 0.0, 1.0, help="share of all (step, layer) slots served from cache "
                                                     "(default: the router file's calibrated value, else 0.4)",
                          search=(0.1, 0.7)),
        "steps": Param(int, 50, 2, 1000, help="step count the router is trained for (and the calls run)"),
        "period": Param(int, 2, 2, 100, help="a full step every `period` steps (paper: 2)"),
        "router": Param(str, "", help="router JSON to load, or to write after training (default: per model/steps)"),
        "samples": Param(int, 4, 1, 64, help="training trajectories (prompts)"),
        "epochs": Param(int, 12, 1, 1000, help="training passes over the cache steps"),
        "budget_s": Param(float, 240.0, 1.0, 7200.0, help="time limit of the training"),
        "guidance": Param(float, 4.0, 0.0, 50.0, help="guidance scale of the training trajectories"),
    }

    def __init__(self, **values: Any) -> None:
        super().__init__(**values)
        self.explicit = frozenset(k for k, v in values.items() if v is not None)
        self.fraction = self.values["fraction"]
        limit = (self.values["period"] - 1) / self.values["period"]
        if self.fraction > limit + 1e-9:
            raise RecipeError(f"l2c: fraction must be <= {limit:.3g} with period={self.values['period']} (every "
                              f"{self.values['period']}-th step runs in full), got {self.fraction:g}")
        self._mode: str | None = None  # training: "record" keeps layer outputs, "mix" blends them by beta
        self._kept: dict[int, Any] = {}
        self._beta: torch.Tensor | None = None

    # --- apply -----------------------------------------------------------------------------------------
    def setup(self, pipe: Any) -> None:
        refuse_chunked_feed_forward(self.name, self.adapter.model)
        self.layers = cache_layers(self.adapter)
        if not self.layers:
            raise refuse(self.name, f"{type(self.adapter.model).__name__} has no attention or feed-forward layers "
                                    "to route")
        for key, (_, layer) in enumerate(self.layers):
            self.patch(layer, lambda inner, key=key: self._layer(key, inner))
        self.skip_norms({id(layer): key for key, (_, layer) in enumerate(self.layers)}, self._served)
        self.record, self.source = self._router(pipe)
        if "fraction" not in self.explicit and "fraction" in self.record:  # calibrated by `effdiff calibrate`
            self.fraction = float(self.record["fraction"])
        self.plan, self.threshold = cache_plan(self.record["scores"], self.fraction)

    def _router(self, pipe: Any) -> tuple[dict[str, Any], Path]:
        v = self.values
        fingerprint = model_fingerprint(self.adapter.model)
        name = getattr(pipe, "effdiff_model_name", None) or fingerprint
        path = Path(v["router"]).expanduser() if v["router"] else router_file(name, v["steps"], v["period"])
        if path.is_file():
            record = read_router(path)
            if record.get("fingerprint") == fingerprint or v["router"]:
                if record.get("fingerprint") != fingerprint:
                    warnings.warn(f"l2c: {path} was trained on other weights (fingerprint "
                                  f"{record.get('fingerprint')} != {fingerprint})", stacklevel=3)
                self._check(record, path, pipe)
                return record, path
            warnings.warn(f"l2c: {path} was trained on other weights; training a new router", stacklevel=3)
        record = train_router(pipe, self)
        record.update(model=name, fingerprint=fingerprint)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1))
        return record, path

    def _check(self, record: dict[str, Any], path: Path, pipe: Any) -> None:
        steps, period = self.values["steps"], self.values["period"]
        if record["steps"] != steps:
            raise refuse(self.name, f"router {path} was trained for {record['steps']} steps, not {steps}; train one "
                                    f"for {steps} (effdiff calibrate --method l2c --steps {steps}) or use "
                                    f"l2c:steps={record['steps']}")
        if record["period"] != period:
            raise refuse(self.name, f"router {path} was trained with period={record['period']}, not {period}")
        scheduler = type(pipe.scheduler).__name__
        if record["scheduler"] != scheduler:
            raise refuse(self.name, f"router {path} was trained with {record['scheduler']}, the pipeline uses "
                                    f"{scheduler}; train one for it (router=ANOTHER_PATH)")
        names = [n for n, _ in self.layers]
        if record["layers"] != names:
            raise refuse(self.name, f"router {path} routes other layers than {type(self.adapter.model).__name__} "
                                    f"has ({len(record['layers'])} vs {len(names)})")

    # --- inference -----------------------------------------------------------------------------------
    def prepare_call(self, arguments: dict[str, Any], explicit: frozenset[str]) -> None:
        steps = arguments.get("num_inference_steps")  # the user's, or a solver's set before us
        if steps is None:
            arguments["num_inference_steps"] = self.values["steps"]
        elif steps != self.values["steps"]:
            raise refuse(self.name, f"the router is trained for {self.values['steps']} steps, this call asks for "
                                    f"{steps}; use l2c:steps={steps} (trains or loads that router)")

    def begin(self, state: dict[str, Any], ctx: StepContext) -> None:
        timesteps = self.record["timesteps"]
        if not ctx.timesteps or len(ctx.timesteps) > len(timesteps):
            index = None
        else:
            tail = timesteps[len(timesteps) - len(ctx.timesteps):]
            if any(abs(a - b) > 1e-3 for a, b in zip(tail, ctx.timesteps, strict=True)):
                raise refuse(self.name, f"the router was trained on timesteps {timesteps[:3]}...; this call runs "
                                        f"{ctx.timesteps[:3]}... (another scheduler or spacing)")
            index = len(timesteps) - ctx.total_steps + ctx.step_index
        full = index is None or index % self.values["period"] == 0 or not state.get("outputs")
        state["keep"] = full
        state["reuse"] = frozenset() if full or index >= len(self.plan) else self.plan[index]
        if full:
            state["outputs"] = {}
        self.count(bool(state["reuse"]))

    def _served(self, key: int, tokens: tuple[int, ...] | None = None) -> bool:
        """Routed to reuse this step, kept, and (when known) kept at the same token count."""
        state = self.current
        kept = state.get("outputs", {}).get(key)
        return (self._mode is None and key in state.get("reuse", ()) and kept is not None
                and (tokens is None or kept[1] == tokens))

    def _layer(self, key: int, inner: Forward) -> Forward:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if self._mode is not None:  # router training
                out = inner(*args, **kwargs)
                if self._mode == "record":
                    self._kept[key] = out
                    return out
                return _blend(self._beta[key], out, self._kept[key])
            state = self.current
            tokens = token_shape(args, kwargs)
            if self._served(key, tokens):
                return state["outputs"][key][0]
            out = inner(*args, **kwargs)
            if state.get("keep"):
                state["outputs"][key] = (out, tokens)
            return out

        return forward

    def describe(self) -> str:
        threshold = "none" if self.threshold is None else f"{self.threshold:.3g}"
        return (f"{super().describe()} [trained router {self.source} in {self.record.get('train_seconds', 0):.0f} s; "
                f"caching {self.fraction:.0%} of layer-steps (score < {threshold})]")


def read_router(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
        missing = [k for k in RECORD_KEYS if k not in record]
        if missing:
            raise KeyError(", ".join(missing))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RecipeError(f"l2c: {path} is not an L2C router ({exc})") from None
    return record


# --- training -----------------------------------------------------------------------------------------------
def _training_prompts(pipe: Any, count: int) -> list[str]:
    if callable(getattr(pipe, "effdiff_prompts", None)):
        return list(pipe.effdiff_prompts("eval", count))
    return [""] * count


def _record_trajectories(pipe: Any, method: LearningToCache) -> tuple[dict[int, list[tuple]], list[float]]:
    """Run the pipeline once, keeping every first-order denoiser call's inputs and output, by solver step."""
    v, ctx, model = method.values, method._ctx, method.adapter.model
    calls: dict[int, list[tuple]] = {}
    pending: list[tuple[int, tuple, dict]] = []

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        pending.append((ctx.step_index if ctx.first_order else -1, args, kwargs))

    def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        step, args, kwargs = pending.pop()
        if step >= 0:
            calls.setdefault(step, []).append((args, kwargs, first_tensor(output).detach()))

    handles = [model.register_forward_pre_hook(pre, with_kwargs=True),
               model.register_forward_hook(post, with_kwargs=True)]
    try:
        sample(pipe, _training_prompts(pipe, v["samples"]), v["steps"], v["guidance"], seed=0)
    finally:
        for handle in handles:
            handle.remove()
    return calls, list(ctx.timesteps)


def train_router(pipe: Any, method: LearningToCache, log: Any = None) -> dict[str, Any]:
    """Learn the router scores of ``method``'s layers on ``pipe`` (the paper's objective; the model stays frozen)."""
    v, model = method.values, method.adapter.model
    start = time.perf_counter()
    calls, timesteps = _record_trajectories(pipe, method)
    steps, period, layers = v["steps"], v["period"], len(method.layers)
    if len(timesteps) != steps or sorted(calls) != list(range(steps)):
        raise refuse(method.name, f"recording {steps} steps gave {len(calls)} solver steps over {len(timesteps)} "
                                  "timesteps; the pipeline must run one denoiser call per step at least")
    cache_steps = [s for s in range(steps) if s % period]
    logits = torch.zeros(steps, layers, requires_grad=True)
    optimiser = torch.optim.Adam([logits], lr=LEARNING_RATE)
    rng = random.Random(0)
    history: list[float] = []
    iterations = 0
    try:
        for epoch in range(v["epochs"]):
            order = rng.sample(cache_steps, len(cache_steps))
            for step in order:
                if time.perf_counter() - start > v["budget_s"]:
                    break
                branch = rng.randrange(len(calls[step]))
                args_m, kwargs_m, _ = calls[step - step % period][branch]
                args_s, kwargs_s, teacher = calls[step][branch]
                method._mode, method._kept = "record", {}
                with torch.no_grad():
                    model(*args_m, **kwargs_m)
                method._mode = "mix"
                with torch.enable_grad():
                    method._beta = torch.sigmoid(logits[step])
                    out = first_tensor(model(*args_s, **kwargs_s))
                    error = (out - teacher).pow(2).mean() / teacher.pow(2).mean().clamp_min(1e-12)
                    loss = error + L1_WEIGHT * method._beta.mean()
                    (grad,) = torch.autograd.grad(loss, [logits])
                logits.grad = grad
                optimiser.step()
                iterations += 1
                history.append(float(loss.detach()))
            if log is not None and history:
                log(f"l2c epoch {epoch + 1}/{v['epochs']}: loss {sum(history[-len(order):]) / len(order):.5f} "
                    f"({time.perf_counter() - start:.0f} s)")
    finally:
        method._mode, method._kept, method._beta = None, {}, None
    scores = torch.sigmoid(logits.detach())
    return {"method": "l2c", "steps": steps, "period": period, "scheduler": type(pipe.scheduler).__name__,
            "timesteps": timesteps, "layers": [n for n, _ in method.layers],
            "scores": [None if s % period == 0 else [round(float(x), 6) for x in scores[s]] for s in range(steps)],
            "samples": v["samples"], "guidance": v["guidance"], "epochs": v["epochs"], "iterations": iterations,
            "l1_weight": L1_WEIGHT, "loss_first": history[0] if history else None,
            "loss_last": history[-1] if history else None, "train_seconds": round(time.perf_counter() - start, 2)}
