"""``effdiff.accelerate(pipe, recipe)``: patch a diffusers pipeline in place, reversibly.

The pipeline's class is swapped for a same-named subclass whose ``__call__`` resets the step
context and lets methods adjust defaults (e.g. a solver's steps) before the original call runs;
``pipe.effdiff.remove()`` undoes everything in reverse order, restoring the class. The handle stays on
the pipeline, inactive, so that a second ``remove()`` is a no-op and ``describe()`` still answers
(``is_accelerated`` tells the two states apart).
Accelerating an already accelerated pipeline *stacks*: the combined recipe is checked, the old one
removed and the combination re-applied in declared order.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from effdiff.adapters import adapter_for, denoiser_attr
from effdiff.adapters.compiled import block_compiler, compile_regions, decompile, how_compiled
from effdiff.context import ContextHooks, StepContext
from effdiff.patches import PatchLog
from effdiff.recipe import RecipeError, RecipeLike, build, check, order, to_string
from effdiff.registry import Method


class EffdiffHandle:
    """``pipe.effdiff``: what is active, the live step context, and the way back."""

    def __init__(self, pipe: Any, methods: list[Method]) -> None:
        self.pipe = pipe
        self.methods: list[Method] = []
        self.regions = 0
        self.context = StepContext()
        self.adapter = adapter_for(pipe)
        self._base_class = type(pipe)
        self._signature = inspect.signature(self._base_class.__call__)
        self._core = PatchLog()  # the core's own edits: a compiled denoiser recompiled by regions
        attr = denoiser_attr(pipe)
        self.compiled = None if all(m.graph_safe for m in methods) else how_compiled(getattr(pipe, attr))
        compiler = None
        if self.compiled is not None:
            compiler = block_compiler(getattr(pipe, attr))
            decompile(pipe, attr, self._core)
        self._hooks = ContextHooks(self.context, getattr(pipe, attr))
        self.active = True
        pipe.__class__ = _call_class(self._base_class)
        pipe.__dict__["effdiff"] = self
        try:
            for method in methods:
                method.attach(pipe, self.context, self.adapter, tuple(methods), indirect=compiler is not None)
                self.methods.append(method)
                compiler = compiler or method.region_compiler()
            if compiler is not None:
                blocks = [ref.module for ref in self.adapter.blocks()]
                self.regions = compile_regions(self.adapter.model, blocks, [m.patches for m in self.methods],
                                               compiler, self._core)
        except BaseException:
            self.remove()
            raise

    @property
    def recipe(self) -> str:
        return to_string(self.methods)

    def describe(self) -> str:
        """One line per active method with its parameters, in application order."""
        head = f"effdiff on {type(self.adapter.model).__name__} ({self.adapter.kind})"
        if self.compiled and self.active:
            head += f", compiled ({self.compiled}) as {self.regions} regions beneath the methods' patches"
        if not self.active:
            return head + ": removed, no methods active"
        if not self.methods:
            return head + ": no methods active"
        return "\n".join([head + ":"] + [f"  {i + 1}. {m.describe()}" for i, m in enumerate(self.methods)])

    def __repr__(self) -> str:
        return f"<effdiff {self.recipe or 'none'}>"

    def _call(self, args: tuple, kwargs: dict) -> Any:
        bound = self._signature.bind(self.pipe, *args, **kwargs)
        explicit = frozenset(bound.arguments)
        for method in self.methods:
            method.prepare_call(bound.arguments, explicit)
        guidance = bound.arguments.get("guidance_scale", _default(self._signature, "guidance_scale"))
        self._hooks.begin_call(self.pipe.scheduler, guidance if isinstance(guidance, (int, float)) else None)
        return self._base_class.__call__(*bound.args, **bound.kwargs)

    def remove(self) -> None:
        """Undo every method (last first) and the hooks; the pipeline behaves exactly as before.

        Removing twice is harmless: the second call finds nothing to undo.
        """
        if not self.active:
            return
        while self.methods:
            self.methods.pop().detach()
        self._hooks.remove()
        self._core.restore()
        if type(self.pipe) is not self._base_class:
            self.pipe.__class__ = self._base_class
        self.active = False


def is_accelerated(pipe: Any) -> bool:
    """Whether an effdiff recipe is active on ``pipe`` (a removed one leaves an inactive handle behind)."""
    handle = getattr(pipe, "__dict__", {}).get("effdiff")
    return handle is not None and handle.active


def _default(signature: inspect.Signature, name: str) -> Any:
    param = signature.parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


_CALL_CLASSES: dict[type, type] = {}


def _call_class(base: type) -> type:
    """A subclass of ``base`` (same name) whose ``__call__`` goes through the handle."""
    if base not in _CALL_CLASSES:
        def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
            return self.__dict__["effdiff"]._call(args, kwargs)

        __call__.__doc__ = base.__call__.__doc__
        __call__.__signature__ = inspect.signature(base.__call__)  # type: ignore[attr-defined]
        _CALL_CLASSES[base] = type(base.__name__, (base,), {
            "__call__": __call__, "__module__": base.__module__, "__qualname__": base.__qualname__,
            "_effdiff_base": base,
        })
    return _CALL_CLASSES[base]


def accelerate(pipe: Any, recipe: RecipeLike) -> Any:
    """Apply ``recipe`` to ``pipe`` in place and return it; refusals happen before any compute."""
    if isinstance(pipe, nn.Module):  # the methods follow the pipeline's steps: its call is where they hook in
        raise TypeError(f"effdiff.accelerate takes the pipeline, not its {type(pipe).__name__}: pass the pipeline "
                        "that holds it as .unet or .transformer")
    adapter = adapter_for(pipe)
    device = adapter.device.type
    target = (adapter.kind, device, type(adapter.model).__name__, adapter.stream_layouts())
    new = build(recipe, *target)
    handle: EffdiffHandle | None = pipe.__dict__.get("effdiff")
    if handle is None or not handle.active:
        EffdiffHandle(pipe, new)
        return pipe
    _refuse_repeats(handle.methods, new)
    combined = handle.methods + new
    check(combined, *target)
    combined = order(combined)
    previous = list(handle.methods)
    handle.remove()
    try:
        EffdiffHandle(pipe, combined)
    except BaseException:
        EffdiffHandle(pipe, previous)  # a refusal while applying keeps what was active, as a check refusal does
        raise
    return pipe


def _refuse_repeats(active: list[Method], new: list[Method]) -> None:
    """A method asked for again by a later ``accelerate`` call: name both calls, not "listed twice"."""
    by_name = {m.name: m for m in active}
    for method in new:
        if method.name in by_name:
            raise RecipeError(
                f"{method.name} is already active on this pipeline (an earlier accelerate call applied "
                f"{by_name[method.name].spec()!r}); this call asks for {method.spec()!r} again. To change its "
                "settings, call pipe.effdiff.remove() and accelerate with the whole recipe")
