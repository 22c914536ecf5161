"""Step context: which solver step, which denoiser call, which CFG branch — given, never guessed.

The core keeps it current through two hooks: a forward pre-hook on the denoiser (counts calls,
reads the timestep) and a wrapper on the instance's ``scheduler.step`` (counts finished solver
steps). ``begin_call`` resets it at the start of every pipeline call. Methods only read it, so none
has to search ``scheduler.timesteps`` for ``t`` (which breaks on img2img and repeated timesteps).

That wrapper is the only one: a method that must act around a solver step (Faster Diffusion's noise
injection, PTQD's variance correction) registers a *step filter* with ``wrap_step`` instead of wrapping
``scheduler.step`` itself, so the order of several such methods is the order they were applied, decided
by the core, and a scheduler swapped between calls is covered without any method noticing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

StepFilter = Callable[[Callable[..., Any], tuple, dict], Any]


def _bind(step_filter: StepFilter, call_next: Callable[..., Any]) -> Callable[..., Any]:
    return lambda *args, **kwargs: step_filter(call_next, args, kwargs)


@dataclass
class StepContext:
    """Where the current pipeline call is.

    ``step_index`` counts solver steps over the steps actually run (0 at the first step of an img2img
    call); ``call_index`` counts denoiser calls. They differ for two-evaluation schedulers (Heun,
    KDPM2), where ``first_order`` tells the predictor call from the corrector.
    """

    step_index: int = 0
    call_index: int = -1
    timestep: float | None = None
    total_steps: int = 0
    timesteps: list[float] = field(default_factory=list)
    first_order: bool = True
    cfg: bool = False
    branch: str = "cond"
    _state: dict[Any, dict[str, Any]] = field(default_factory=dict, repr=False)
    _reset_callbacks: list[Callable[[], None]] = field(default_factory=list, repr=False)
    _step_filters: list[StepFilter] = field(default_factory=list, repr=False)

    @property
    def is_last_step(self) -> bool:
        return self.step_index >= self.total_steps - 1

    def state(self, owner: Any) -> dict[str, Any]:
        """Mutable per-call state for ``owner`` in the current CFG branch; emptied on every call."""
        return self._state.setdefault((id(owner), self.branch), {})

    def on_reset(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Run ``callback`` at the start of every pipeline call; returns a function that unregisters it."""
        self._reset_callbacks.append(callback)
        return lambda: self._reset_callbacks.remove(callback) if callback in self._reset_callbacks else None

    def wrap_step(self, step_filter: StepFilter) -> Callable[[], None]:
        """Run every solver step through ``step_filter(call_next, args, kwargs)``; returns its unregister function.

        ``call_next(*args, **kwargs)`` runs the rest of the chain and the scheduler's own ``step``; a filter may
        change the arguments (the sample) or the result. Filters registered later run outside earlier ones.
        """
        self._step_filters.append(step_filter)
        return lambda: self._step_filters.remove(step_filter) if step_filter in self._step_filters else None

    def run_step(self, step: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """``step(*args, **kwargs)`` through the registered filters, innermost first."""
        call = step
        for step_filter in self._step_filters:
            call = _bind(step_filter, call)
        return call(*args, **kwargs)

    def reset(self, cfg: bool = False) -> None:
        self.step_index, self.call_index = 0, -1
        self.timestep, self.total_steps, self.timesteps = None, 0, []
        self.first_order, self.cfg = True, cfg
        self.branch = "batched" if cfg else "cond"
        self._state.clear()
        for callback in list(self._reset_callbacks):
            callback()


def timestep_of(args: tuple, kwargs: dict) -> float | None:
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if isinstance(t, torch.Tensor):
        return float(t.flatten()[0]) if t.numel() else None
    return None if t is None else float(t)


class ContextHooks:
    """Installs and removes the hooks that keep a ``StepContext`` current for one pipeline."""

    def __init__(self, ctx: StepContext, denoiser: torch.nn.Module) -> None:
        self.ctx = ctx
        self.denoiser = denoiser
        self._handle = denoiser.register_forward_pre_hook(self._pre_forward, with_kwargs=True, prepend=True)
        self._scheduler: Any = None
        self._had_step_attr = False
        self._prev_step_attr: Any = None
        self._new_call = False

    def begin_call(self, scheduler: Any, guidance_scale: float | None) -> None:
        """Reset for a new pipeline call and make sure the pipeline's current scheduler is hooked."""
        self.ctx.reset(cfg=guidance_scale is not None and guidance_scale > 1.0)
        self._new_call = True
        if scheduler is not self._scheduler:
            self._unhook_scheduler()
            self._hook_scheduler(scheduler)

    def _hook_scheduler(self, scheduler: Any) -> None:
        self._scheduler = scheduler
        self._had_step_attr = "step" in vars(scheduler)
        self._prev_step_attr = vars(scheduler).get("step")
        inner = scheduler.step
        ctx = self.ctx

        # wraps: pipelines read ``inspect.signature(scheduler.step)`` to decide whether to pass ``generator``
        # (diffusers' prepare_extra_step_kwargs); a bare (*args, **kwargs) made stochastic schedulers (LCM, Euler
        # ancestral, SDE-DPM++) draw from the global RNG under any recipe, so a seeded call was not reproducible
        @functools.wraps(inner)
        def step(*args: Any, **kwargs: Any) -> Any:
            out = ctx.run_step(inner, args, kwargs)
            ctx.first_order = bool(getattr(scheduler, "state_in_first_order", True))
            if ctx.first_order:
                ctx.step_index += 1
            return out

        scheduler.step = step

    def _unhook_scheduler(self) -> None:
        if self._scheduler is None:
            return
        if self._had_step_attr:
            self._scheduler.step = self._prev_step_attr
        else:
            vars(self._scheduler).pop("step", None)
        self._scheduler = None

    @torch.compiler.disable  # Python bookkeeping: never traced into (or guarded by) a compiled denoiser's graph
    def _pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ctx = self.ctx
        if self._new_call:
            self._new_call = False
            self._read_schedule(timestep_of(args, kwargs))
        elif ctx.call_index >= 0 and self._scheduler is None:
            ctx.step_index += 1  # called outside a hooked pipeline: one call per step
        ctx.call_index += 1
        ctx.timestep = timestep_of(args, kwargs)
        if self._scheduler is not None:
            ctx.first_order = bool(getattr(self._scheduler, "state_in_first_order", True))

    def _read_schedule(self, t0: float | None) -> None:
        """Total steps actually run: the schedule's tail from the begin index (img2img) to the end."""
        scheduler = self._scheduler
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None:
            return
        values = [float(t) for t in torch.as_tensor(timesteps).flatten().tolist()]
        begin = getattr(scheduler, "begin_index", None)
        if begin is None:
            begin = next((i for i, t in enumerate(values) if t0 is not None and abs(t - t0) < 1e-6), 0)
        order = max(int(getattr(scheduler, "order", 1)), 1)
        run = values[begin:]
        self.ctx.timesteps = run
        self.ctx.total_steps = -(-len(run) // order)

    def remove(self) -> None:
        self._handle.remove()
        self._unhook_scheduler()
