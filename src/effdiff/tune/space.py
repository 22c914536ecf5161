"""The search space of ``effdiff tune``, read from the registry's declarations alone.

Why slots: two methods that claim the same main resource (``Method.exclusive[0]``: the scheduler, the block
outputs, the float dtype, …) can never be stacked, so a stack is at most one method per resource. Each slot is an
Optuna categorical ("none" or a method); each chosen method's searched parameters (``Param.search``) are
suggested under its own name, so Optuna's conditional (define-by-run) spaces keep their statistics apart. The
registry's ordering and exclusivity rules (``recipe.build``) then refuse what still cannot run — a refused stack
is pruned before anything is computed. The families that need several processes (parallel) or pay minutes per
trial (compile) are left out unless asked for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from effdiff.errors import RecipeError
from effdiff.recipe import build, to_string
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
    return out


def suggest(trial: Any, space: dict[str, list[str]], max_steps: int) -> str:
    """One stack from ``trial`` (an ``optuna.Trial``): a method or none per slot, then each one's knobs.

    A searched step count never exceeds the baseline's ``max_steps``: more steps than the reference is never
    faster. Raises RecipeError for a stack the registry refuses (the caller prunes the trial).
    """
    methods: list[Method] = []
    for slot, names in space.items():
        name = trial.suggest_categorical(f"slot:{slot}", [NONE, *names])
        if name == NONE:
            continue
        cls = all_methods()[name]
        values = {key: _suggest_value(trial, f"{name}.{key}", p, max_steps if key == "steps" else None)
                  for key, p in searched(cls).items()}
        methods.append(cls(**values))
    return to_string(build(methods))


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
