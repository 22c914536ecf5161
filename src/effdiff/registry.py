"""Method base class and discovery.

A method *declares* what it is (family, backbones, devices, search space, ordering, paper); the
core (``recipe.py``) decides order and compatibility from those declarations alone.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from effdiff.adapters.base import STREAMS as BLOCK_STREAMS
from effdiff.errors import RecipeError
from effdiff.patches import PatchLog

if TYPE_CHECKING:
    from effdiff.adapters.base import Adapter
    from effdiff.context import StepContext

FAMILIES: tuple[str, ...] = ("solver", "cache", "tokens", "quant", "prune", "distill", "parallel", "compile")
BACKBONES: frozenset[str] = frozenset({"unet", "dit"})
STREAMS: frozenset[str] = frozenset(BLOCK_STREAMS)  # the block stream layouts the adapters know


@dataclass(frozen=True)
class Paper:
    """The publication a method implements; ``arxiv`` links the registry to the catalogue, ``url`` cites a paper
    that is not on arXiv (a DOI)."""

    title: str
    arxiv: str | None = None
    venue: str | None = None
    url: str | None = None


@dataclass(frozen=True)
class Param:
    """One hyperparameter: its type and valid range. Together the params are the search space."""

    type: type
    default: Any
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None
    help: str = ""
    # What ``effdiff tune`` tries: (low, high) for an int or float, or three or more values to try (a step count
    # with a precomputed schedule each); the values to try for a bool, a string or a choice. None: the knob is
    # not a speed/quality trade-off (a seed, a path, a training budget) and keeps its default while tuning.
    search: tuple[Any, ...] | None = None

    def __post_init__(self) -> None:
        if self.search is not None:
            if len(self.search) < 2:
                raise TypeError(f"search needs (low, high) or two or more values, got {self.search!r}")
            for value in self.search:
                self.coerce(value)  # a search range outside the valid range is a declaration error

    def describe(self) -> str:
        if self.choices is not None:
            return f"one of {', '.join(map(str, self.choices))}"
        if self.type is bool:
            return "true or false"
        if self.low is not None or self.high is not None:
            low = "-inf" if self.low is None else f"{self.low:g}"
            high = "inf" if self.high is None else f"{self.high:g}"
            return f"{self.type.__name__} in [{low}, {high}]"
        return self.type.__name__

    def coerce(self, value: Any) -> Any:
        """Convert (strings from a recipe included) and validate, or raise ValueError with the range."""
        if self.type is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError(f"expected {self.describe()}, got {value!r}")
                value = lowered in ("true", "1", "yes", "on")
            elif not isinstance(value, (bool, int)) or value not in (0, 1):
                raise ValueError(f"expected {self.describe()}, got {value!r}")
            return bool(value)
        try:
            if self.type is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            if self.type is int and isinstance(value, bool):
                raise ValueError
            converted = self.type(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"expected {self.describe()}, got {value!r}") from None
        if isinstance(converted, float) and converted != converted:  # NaN
            raise ValueError(f"expected {self.describe()}, got {value!r}")
        if self.choices is not None and converted not in self.choices:
            raise ValueError(f"expected {self.describe()}, got {value!r}")
        if self.low is not None and converted < self.low or self.high is not None and converted > self.high:
            raise ValueError(f"expected {self.describe()}, got {value!r}")
        return converted


_REGISTRY: dict[str, type[Method]] = {}
_ALIASES: dict[str, str] = {}  # alias -> registered name


class Method:
    """Base of every acceleration method.

    Subclasses that set ``name`` register themselves. ``after`` / ``before`` name families or
    methods this one must follow / precede when both are in a recipe; ``exclusive`` names resources
    the method owns alone (two methods claiming the same one cannot be stacked).
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    backbones: ClassVar[frozenset[str]] = BACKBONES
    streams: ClassVar[frozenset[str]] = STREAMS  # block stream layouts it handles (MMDiTs: joint, concat)
    devices: ClassVar[frozenset[str]] = frozenset({"cpu", "cuda", "mps"})
    params: ClassVar[dict[str, Param]] = {}
    after: ClassVar[tuple[str, ...]] = ()
    before: ClassVar[tuple[str, ...]] = ()
    exclusive: ClassVar[tuple[str, ...]] = ()
    paper: ClassVar[Paper | None] = None
    also: ClassVar[tuple[Paper, ...]] = ()  # further papers it implements (a form, an objective), for the catalogue
    summary: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()  # other names users know it by ("dpm++" for dpmpp2m)
    # False: the method decides per step in Python (caches, token methods); under it a compiled denoiser is
    # compiled per block, so those decisions never become graph guards (``adapters/compiled.py``)
    graph_safe: ClassVar[bool] = True
    # Recipes the conformance tester runs on every stock pipeline: "noop" computes exactly what the pipeline
    # computes without the method (bit for bit); "skips" skips or reduces work within three steps.
    examples: ClassVar[dict[str, str]] = {}
    tuner: ClassVar[str | None] = None  # module with run(...) that calibrates this method (``effdiff calibrate``)
    # ``effdiff tune`` tries a method that declares a searched parameter (``Param.search``); one without any is
    # tried as it is only if it says so here (a dtype cast, a shipped checkpoint): a seed-only or simulated method
    # would only cost search time.
    tried_by_tune: ClassVar[bool] = False
    # Its searched knobs pay a calibration per new value (a schedule search, a router): ``effdiff tune`` tries it
    # only after ``--calibrate`` ran its tuner, which prepares the values the search then chooses among.
    tuned_first: ClassVar[bool] = False
    # Call arguments the method chooses (in ``prepare_call``) as part of what it is: a caller that compares
    # recipes (the bench) leaves them out of its calls, or it would override them. A solver's ``steps`` is
    # declared by its family; a distilled student declares its steps and its guidance.
    decides: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__ or not cls.name:
            return  # an intermediate base (e.g. one per family)
        if cls.family not in FAMILIES:
            raise TypeError(f"{cls.__name__}.family must be one of {FAMILIES}, got {cls.family!r}")
        if not cls.backbones <= BACKBONES:
            raise TypeError(f"{cls.__name__}.backbones must be a subset of {sorted(BACKBONES)}")
        existing = _REGISTRY.get(cls.name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise TypeError(f"method name {cls.name!r} is taken by {existing.__qualname__}")
        _REGISTRY[cls.name] = cls
        for alias in cls.aliases:
            owner = _ALIASES.setdefault(alias, cls.name)
            if owner != cls.name or alias in _REGISTRY:
                raise TypeError(f"alias {alias!r} of {cls.name} is already a name or alias of {owner}")

    def __init__(self, **values: Any) -> None:
        unknown = [k for k in values if k not in self.params]
        if unknown:
            raise RecipeError(self._unknown_param_message(unknown[0]))
        self.given = frozenset(k for k, v in values.items() if v is not None)  # what the recipe set explicitly
        self.values: dict[str, Any] = {}
        for key, spec in self.params.items():
            raw = values.get(key, spec.default)
            try:
                self.values[key] = spec.coerce(raw) if raw is not None else None
            except ValueError as exc:
                raise RecipeError(f"{self.name}: parameter {key!r} {exc}") from None
        self.applied = False
        self.patches = PatchLog()

    def _unknown_param_message(self, key: str) -> str:
        valid = sorted(self.params)
        if not valid:
            return f"{self.name} takes no parameters, got {key!r}"
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        listed = ", ".join(f"{k} ({self.params[k].describe()})" for k in valid)
        return f"{self.name} has no parameter {key!r}{hint}; valid: {listed}"

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def spec(self) -> str:
        """The recipe text that rebuilds this method, non-default values only."""
        changed = [f"{k}={_fmt(v)}" for k, v in self.values.items() if v != self.params[k].default]
        return self.name + (":" + ",".join(changed) if changed else "")

    def describe(self) -> str:
        values = ", ".join(f"{k}={_fmt(v)}" for k, v in self.values.items())
        return f"{self.name} [{self.family}]" + (f" ({values})" if values else "")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec()}>"

    # --- lifecycle -------------------------------------------------------------------------------
    # The handle sets ``self.adapter`` (the denoiser's structural view), a fresh ``self.patches`` (the undo
    # log) and ``self.recipe`` (every method of the recipe, in order) before ``apply``, and calls ``remove``
    # then ``self.patches.restore()`` to take the method off.
    adapter: Adapter
    recipe: tuple[Method, ...] = ()

    def apply(self, pipe: Any, ctx: StepContext) -> None:
        """Patch ``pipe`` in place, every change through ``self.patches`` (which ``remove`` unwinds)."""
        raise NotImplementedError

    def attach(self, pipe: Any, ctx: StepContext, adapter: Adapter, recipe: tuple[Method, ...] = (),
               indirect: bool = False) -> None:
        """What the handle runs: a fresh undo log, the adapter, then ``apply``; unwound if ``apply`` fails.

        ``indirect``: the denoiser is compiled beneath the patches (``PatchLog``'s indirections).
        """
        self.patches = PatchLog(indirect)
        self.adapter = adapter
        self.recipe = recipe
        try:
            self.apply(pipe, ctx)
        except BaseException:
            self.detach()
            raise
        self.applied = True

    def region_compiler(self) -> Callable[[Callable[..., Any]], Callable[..., Any]] | None:
        """A compiler the core should apply beneath the patches of the methods after this one (``compile``)."""
        return None

    def unavailable(self, pipe: Any) -> str | None:
        """Why this method, as configured, cannot run on ``pipe`` until something is made for it (a trained student,
        a compressed checkpoint) — the refusal ``apply`` would give, with the command that makes it; None when
        nothing is missing. ``effdiff tune`` leaves such methods out rather than spend trials on their refusals."""
        return None

    def remove(self) -> None:
        """Drop what the undo log does not hold (caches, statistics); the patches themselves unwind after."""

    def detach(self) -> None:
        """Take the method off: ``remove`` then the undo log, so the pipeline is exactly as before ``attach``."""
        self.remove()
        self.patches.restore()
        self.applied = False

    def prepare_call(self, arguments: dict[str, Any], explicit: frozenset[str]) -> None:
        """Adjust a call's bound arguments before it runs (e.g. default steps).

        ``explicit`` names what the user passed; a method never overrides those (one that consumes a value keeps
        its meaning: ``guidance-distill`` takes the caller's guidance scale as its w and runs one pass).
        """


def _fmt(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


_LOADED = False


def _ensure_loaded() -> None:
    """Import every module under ``effdiff.methods`` once: a method registers itself by being defined, so a new
    method is one new file and no list anywhere names it."""
    global _LOADED
    if _LOADED:
        return
    import importlib
    import pkgutil

    import effdiff.methods

    for info in pkgutil.walk_packages(effdiff.methods.__path__, "effdiff.methods."):
        importlib.import_module(info.name)
    _LOADED = True


def all_methods() -> dict[str, type[Method]]:
    """Every registered method class by name, sorted by family order then name."""
    _ensure_loaded()
    ordered = sorted(_REGISTRY.values(), key=lambda c: (FAMILIES.index(c.family), c.name))
    return {c.name: c for c in ordered}


def aliases() -> dict[str, str]:
    """Every alias with the registered name it stands for."""
    _ensure_loaded()
    return dict(_ALIASES)


def get_method(name: str) -> type[Method]:
    """The class registered under ``name``, or a RecipeError with the valid names and a did-you-mean."""
    methods = all_methods()
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key in methods:
        return methods[key]
    close = difflib.get_close_matches(key, [*methods, *_ALIASES], n=1)
    close = [_ALIASES.get(c, c) for c in close]
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise RecipeError(f"unknown method {name!r}; {hint}valid methods: {', '.join(methods)}")


def tunable_methods() -> list[str]:
    """Names of the methods that declare a tuner (what ``effdiff calibrate --method`` accepts)."""
    return [name for name, cls in all_methods().items() if cls.tuner]


def implemented_arxiv_ids() -> dict[str, list[str]]:
    """arXiv id -> names of the registered methods implementing it (feeds the catalogue status)."""
    out: dict[str, list[str]] = {}
    for cls in all_methods().values():
        for paper in (cls.paper, *cls.also):
            if paper is not None and paper.arxiv:
                out.setdefault(paper.arxiv, []).append(cls.name)
    return out


@dataclass
class MethodRow:
    """One line of ``effdiff methods``."""

    name: str
    family: str
    backbones: str
    devices: str
    params: str
    paper: str
    arxiv: str
    venue: str
    summary: str = field(default="")
    streams: str = field(default="")
    url: str = field(default="")


def methods_rows() -> list[dict[str, str]]:
    """Rows for the CLI's ``effdiff methods`` table, one per registered method."""
    rows = []
    for cls in all_methods().values():
        params = ", ".join(f"{k}={_fmt(p.default)} ({p.describe()})" for k, p in cls.params.items())
        paper = cls.paper or Paper("")
        rows.append(MethodRow(
            name=cls.name, family=cls.family, backbones=",".join(sorted(cls.backbones)),
            devices=",".join(sorted(cls.devices)), params=params, paper=paper.title,
            arxiv=paper.arxiv or "", venue=paper.venue or "", summary=cls.summary,
            streams=",".join(sorted(cls.streams)), url=paper.url or "",
        ).__dict__)
    return rows


def refusal(check: Callable[[], Any]) -> str | None:
    """The message of the RecipeError ``check()`` raises, None when it raises none (``Method.unavailable``)."""
    try:
        check()
    except RecipeError as exc:
        return str(exc)
    return None
