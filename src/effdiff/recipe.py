"""Recipes: ``"dpmpp2m:steps=20+deepcache:interval=3"`` -> ordered, checked method objects.

Grammar: methods joined by ``+``; each is ``name`` or ``name:key=value,key=value``. Order and
compatibility come only from the methods' declarations (``after``/``before``/``exclusive``,
``backbones``, ``devices``), and every refusal happens before any compute.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from effdiff.registry import Method, RecipeError, aliases, get_method

RecipeLike = str | Method | Sequence[str | Method] | None

__all__ = ["RecipeError", "RecipeLike", "build", "check", "order", "parse", "split", "to_string"]


def _parse_one(text: str) -> Method:
    text = text.strip()
    if not text:
        raise RecipeError("empty method in recipe (two '+' in a row, or a '+' at an end)")
    name, sep, rest = text.partition(":")
    cls = get_method(name)
    values: dict[str, Any] = {}
    if rest.strip():
        for pair in rest.split(","):
            key, eq, value = pair.partition("=")
            key = key.strip()
            if not eq or not key:
                raise RecipeError(f"{cls.name}: expected key=value, got {pair.strip()!r}")
            if key in values:
                raise RecipeError(f"{cls.name}: parameter {key!r} given twice")
            values[key] = value.strip()
    elif sep:
        raise RecipeError(f"{cls.name}: nothing after ':'; write {cls.name} or {cls.name}:key=value")
    return cls(**values)


def _parse_part(text: str) -> list[Method]:
    """One written part: a method, or ``tuned:NAME`` — the stack ``effdiff tune`` saved under that name."""
    name, _, rest = text.strip().partition(":")
    if name.strip().lower() != "tuned":
        return [_parse_one(text)]
    from effdiff.tuned import load_tuned

    return parse(load_tuned(rest.strip())["recipe"])


def parse(recipe: RecipeLike) -> list[Method]:
    """Method objects in the order written; names and parameters validated."""
    if recipe is None:
        return []
    if isinstance(recipe, Method):
        return [recipe]
    if isinstance(recipe, str):
        if not recipe.strip():
            return []
        return [method for part in split(recipe) for method in _parse_part(part)]
    if isinstance(recipe, Sequence):
        out: list[Method] = []
        for item in recipe:
            if isinstance(item, Method):
                out.append(item)
            elif isinstance(item, str):
                out.extend(parse(item))
            else:
                raise RecipeError(f"a recipe item must be a string or a Method, got {type(item).__name__}")
        return out
    raise RecipeError(f"a recipe must be a string, a Method or a list of them, got {type(recipe).__name__}")


def split(recipe: str) -> list[str]:
    """The method parts of a recipe string, split on the joining '+' (not the one inside ``dpm++``)."""
    return _spell_out_plus_aliases(recipe).split("+") if recipe.strip() else []


def _spell_out_plus_aliases(text: str) -> str:
    """``dpm++`` and friends contain the '+' that joins methods: replace them by their names before splitting."""
    for alias, name in sorted(aliases().items(), key=lambda item: -len(item[0])):
        if "+" in alias:
            text = re.sub(rf"(?<![\w-]){re.escape(alias)}(?=[:+]|\s*$)", name, text, flags=re.IGNORECASE)
    return text


def _refers(method: Method, ref: str) -> bool:
    return ref in (method.name, method.family)


def _must_precede(a: Method, b: Method) -> bool:
    return any(_refers(a, r) for r in b.after) or any(_refers(b, r) for r in a.before)


def order(methods: Sequence[Method]) -> list[Method]:
    """Topological order of the declared constraints; ties keep the written order."""
    remaining = list(methods)
    result: list[Method] = []
    while remaining:
        ready = [m for m in remaining if not any(_must_precede(o, m) for o in remaining if o is not m)]
        if not ready:
            names = ", ".join(m.name for m in remaining)
            raise RecipeError(f"the ordering constraints of {names} contradict each other")
        result.append(ready[0])
        remaining.remove(ready[0])
    return result


def check(methods: Sequence[Method], kind: str | None = None, device: str | None = None,
          backbone_name: str = "", streams: frozenset[str] | None = None) -> None:
    """Refuse duplicates, clashes over an exclusive resource, and unsupported backbones, block stream layouts
    (``streams``: those of the denoiser's blocks, from its adapter) or devices."""
    seen: dict[str, Method] = {}
    for m in methods:
        if m.name in seen:
            raise RecipeError(f"{m.name} is listed twice in the recipe")
        seen[m.name] = m
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            shared = [r for r in a.exclusive if r in b.exclusive]  # in declared order: the main resource first
            if shared:
                raise RecipeError(f"{a.name} and {b.name} cannot be stacked: both take over the {shared[0]}")
    for m in methods:
        if kind is not None and kind not in m.backbones:
            what = f"{backbone_name} ({kind})" if backbone_name else kind
            raise RecipeError(f"{m.name} supports {'/'.join(sorted(m.backbones))} backbones, not {what}")
        if streams is not None and not streams <= m.streams:
            what = backbone_name or "this denoiser"
            raise RecipeError(f"{m.name} works on {'/'.join(sorted(m.streams))}-stream blocks; {what} has "
                              f"{'/'.join(sorted(streams - m.streams))}-stream blocks (text and image tokens in "
                              "one attention), which it does not support yet")
        if device is not None and device not in m.devices:
            raise RecipeError(f"{m.name} runs on {'/'.join(sorted(m.devices))}, not on {device}")


def build(recipe: RecipeLike, kind: str | None = None, device: str | None = None,
          backbone_name: str = "", streams: frozenset[str] | None = None) -> list[Method]:
    """parse -> check -> order: what ``accelerate`` applies."""
    methods = parse(recipe)
    check(methods, kind, device, backbone_name, streams)
    return order(methods)


def to_string(methods: Sequence[Method]) -> str:
    """The recipe text that rebuilds ``methods`` (the inverse of ``parse``)."""
    return "+".join(m.spec() for m in methods)

