"""The search space of ``effdiff tune``, read from the registry's declarations alone.

Why slots: two methods that claim the same main resource (``Method.exclusive[0]``: the scheduler, the block
outputs, the float dtype, …) can never be stacked, so a stack is at most one method per resource. Each slot is an
Optuna categorical ("none" or a method); each chosen method's searched parameters (``Param.search``) are
suggested under its own name, so Optuna's conditional (define-by-run) spaces keep their statistics apart. A method
that takes several resources (a distilled student: the scheduler and the denoiser weights) sits in its main
resource's slot, which comes first; the slots of the resources it also takes are then not suggested at all in
that trial — a stack Optuna can propose is one the exclusivity rules allow (the search spent most of its trials on
such refusals before: Optuna's samplers learn nothing from failed trials). The registry's ordering rules
(``recipe.build``) then refuse what still cannot run, before anything is computed. Methods that need something
made first (``Method.unavailable``: a student not trained, a checkpoint not compressed for this model) are left
out, and so are the families that need several processes (parallel) or pay minutes per trial (compile) unless
asked for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from effdiff.errors import RecipeError
from effdiff.recipe import build, parse, to_string
from effdiff.registry import Method, Param, all_methods

LEFT_OUT_FAMILIES = ("parallel", "compile")
NONE = "none"


@dataclass(frozen=True)
class Target:
    """Where a recipe's denoiser runs: what ``recipe.check`` needs to refuse a stack before any compute."""

    kind: str
    device: str
    backbone_name: str
    streams: frozenset[str]

    @classmethod
    def of(cls, pipe: Any) -> Target:
        from effdiff.adapters import adapter_for

        adapter = adapter_for(pipe)
        return cls(adapter.kind, adapter.device.type, type(adapter.model).__name__, adapter.stream_layouts())


def searched(cls: type[Method]) -> dict[str, Param]:
    """The parameters of ``cls`` that tuning varies."""
    return {name: p for name, p in cls.params.items() if p.search is not None}


def slots(target: Target, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """Main resource -> the methods that may take it on ``target`` (each alone passes the registry's checks).

    ``include`` adds methods or families otherwise left out (``compile``, a method with no searched knob);
    ``exclude`` removes methods or families.
    """
    out: dict[str, list[str]] = {}
    for name, cls in all_methods().items():
        asked = name in include or cls.family in include
        if name in exclude or cls.family in exclude:
            continue
        if not asked and (cls.family in LEFT_OUT_FAMILIES or cls.tuned_first
                          or not (cls.tried_by_tune or searched(cls))):
            continue
        try:
            build(name, target.kind, target.device, target.backbone_name, target.streams)
        except RecipeError:
            continue  # another backbone, device or block layout
        out.setdefault(cls.exclusive[0] if cls.exclusive else cls.family, []).append(name)
    also_taken = {r for names in out.values() for n in names for r in all_methods()[n].exclusive[1:]}
    return dict(sorted(out.items(), key=lambda item: item[0] in also_taken))  # main-resource slots first


def resources(name: str) -> set[str]:
    """Every resource method ``name`` takes, its main one (its slot) included."""
    cls = all_methods()[name]
    return set(cls.exclusive) or {cls.family}


def without_unavailable(space: dict[str, list[str]], pipe: Any) -> tuple[dict[str, list[str]], dict[str, str]]:
    """``space`` without the knob-less methods that cannot run on ``pipe`` until something is made for them (a
    method with searched knobs stays: another value may find what it needs), and why each was left out."""
    methods = all_methods()
    left_out = {name: why for names in space.values() for name in names if not searched(methods[name])
                and (why := methods[name]().unavailable(pipe))}
    kept = {slot: [n for n in names if n not in left_out] for slot, names in space.items()}
    return {slot: names for slot, names in kept.items() if names}, left_out


def suggest(trial: Any, space: dict[str, list[str]], max_steps: int) -> str:
    """One stack from ``trial`` (an ``optuna.Trial``): a method or none per slot, then each one's knobs.

    A slot whose resource a method chosen before it also takes is skipped. A searched step count never exceeds
    the baseline's ``max_steps``: more steps than the reference is never
    faster. Raises RecipeError for a stack the registry refuses (the caller prunes the trial).
    """
    methods: list[Method] = []
    taken: set[str] = set()
    for slot, names in space.items():
        if slot in taken:
            continue  # a method chosen in an earlier slot takes this resource too
        name = trial.suggest_categorical(f"slot:{slot}", [NONE, *names])
        if name == NONE:
            continue
        taken |= resources(name)
        cls = all_methods()[name]
        methods.append(cls(**_knobs(trial, cls, max_steps)))
    return to_string(build(methods))


def refine(trial: Any, recipe: str, max_steps: int) -> str:
    """``recipe``'s methods with their searched knobs suggested by ``trial`` (the refinement stage varies the
    knobs of a confirmed stack, not its methods); the other parameters keep the recipe's values."""
    methods = []
    for method in parse(recipe):
        cls = type(method)
        methods.append(cls(**{**method.values, **_knobs(trial, cls, max_steps)}))
    return to_string(build(methods))


def knob_params(recipe: str, max_steps: int) -> dict[str, Any] | None:
    """The refinement trial's parameters that make ``refine`` return ``recipe`` itself (to enqueue it first);
    None when a knob is outside its searched range."""
    params: dict[str, Any] = {}
    for method in parse(recipe):
        knobs = method_knobs(method, max_steps)
        if knobs is None:
            return None
        params.update(knobs)
    return params


def method_knobs(method: Method, max_steps: int) -> dict[str, Any] | None:
    """``method``'s searched knobs as trial parameters (``name.key``: value); None when one is outside its searched
    range or asks for more steps than the baseline's."""
    params: dict[str, Any] = {}
    for key, param in searched(type(method)).items():
        value, search = method.values[key], param.search or ()
        outside = not search[0] <= value <= search[1] if is_range(param) else value not in search
        if outside or key == "steps" and value > max_steps:
            return None
        params[f"{method.name}.{key}"] = value
    return params


def _knobs(trial: Any, cls: type[Method], max_steps: int) -> dict[str, Any]:
    return {key: _suggest_value(trial, f"{cls.name}.{key}", p, max_steps if key == "steps" else None)
            for key, p in searched(cls).items()}


def is_range(param: Param) -> bool:
    """Whether ``param.search`` is a (low, high) range rather than the values to try."""
    return param.type in (int, float) and param.choices is None and len(param.search or ()) == 2


def _suggest_value(trial: Any, label: str, param: Param, cap: int | None) -> Any:
    search = param.search or ()
    if not is_range(param):
        values = list(search)
        if cap is not None:
            values = [v for v in values if v <= cap] or [min(values)]
        return trial.suggest_categorical(label, values)
    low, high = search
    if cap is not None:
        high = max(low, min(high, cap))
    if param.type is int:
        return trial.suggest_int(label, int(low), int(high))
    log = low > 0 and high / low >= 10  # a threshold spanning decades: sample its scale, not its digits
    return _round(trial.suggest_float(label, float(low), float(high), log=log))


def _round(value: float) -> float:
    """Three significant digits: a saved recipe reads ``threshold=0.137``, and nearby trials share a recipe."""
    if value == 0:
        return 0.0
    return round(value, 2 - int(math.floor(math.log10(abs(value)))))
