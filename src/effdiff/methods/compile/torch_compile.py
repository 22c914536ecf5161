"""``compile``: torch.compile as a recipe step, placed where it composes with the other methods."""

from __future__ import annotations

from typing import Any

import torch

from effdiff.adapters import denoiser_attr
from effdiff.adapters.compiled import how_compiled
from effdiff.context import StepContext
from effdiff.errors import RecipeError
from effdiff.registry import Method, Paper, Param

PYTORCH2 = Paper("PyTorch 2: Faster Machine Learning Through Dynamic Python Bytecode Transformation and Graph "
                 "Compilation", None, "ASPLOS 2024", "https://doi.org/10.1145/3620665.3640366")
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class Compile(Method):
    """Compile the denoiser with ``torch.compile`` (TorchDynamo + Inductor).

    Paper: Ansel et al., PyTorch 2: Faster Machine Learning Through Dynamic Python Bytecode Transformation
    and Graph Compilation (ASPLOS 2024, doi 10.1145/3620665.3640366).

    ``scope=model`` compiles the whole denoiser in place, as ``unet.compile()`` does. ``scope=blocks``
    compiles by regions (the core's ``compile_regions``: every block no later method touches, whole, and
    beneath each patch the module it wraps). ``auto`` picks ``blocks`` when the recipe holds a method that
    decides per step in Python (caches, token methods): compiled under their patches those decisions stay
    eager instead of becoming guards that recompile every step. Applied after weight-changing methods
    (quantization, pruning) so it compiles what they leave, before the caches. The first call pays the
    compilation.
    """

    name = "compile"
    examples = {"noop": "compile:backend=eager"}
    family = "compile"
    paper = PYTORCH2
    after = ("solver", "quant", "prune", "distill")
    before = ("cache", "tokens", "parallel")
    exclusive = ("compilation",)
    summary = "torch.compile the denoiser (whole, or per block under caches)"
    params = {
        "scope": Param(str, "auto", choices=("auto", "model", "blocks"), help="what one graph covers"),
        "mode": Param(str, "default", choices=MODES, help="torch.compile mode"),
        "backend": Param(str, "inductor", choices=("inductor", "eager", "aot_eager", "cudagraphs"),
                         help="torch.compile backend (eager: dynamo only, to check capture without compiling)"),
        "fullgraph": Param(bool, False, help="fail on a graph break instead of splitting the graph"),
        "dynamic": Param(str, "auto", choices=("auto", "true", "false"),
                         help="symbolic shapes (torch.compile's dynamic: auto = None, after a shape changes)"),
    }

    def apply(self, pipe: Any, ctx: StepContext) -> None:
        model = self.adapter.model
        if how_compiled(getattr(pipe, denoiser_attr(pipe))) is not None or how_compiled(model) is not None:
            raise RecipeError(f"compile: {type(model).__name__} is already compiled; drop compile from the recipe "
                              "(effdiff keeps your compilation) or accelerate the uncompiled model")
        options: dict[str, Any] = {"fullgraph": self.values["fullgraph"], "backend": self.values["backend"],
                                   "dynamic": {"auto": None, "true": True, "false": False}[self.values["dynamic"]]}
        if self.values["mode"] != "default":
            options["mode"] = self.values["mode"]
        self.scope = self._scope()
        self._compiler = lambda fn: torch.compile(fn, **options)
        if self.scope == "model":
            self.patches.attr(model, "_compiled_call_impl", self._compiler(model._call_impl))

    def region_compiler(self) -> Any:
        """``scope=blocks``: the core compiles beneath the later methods' patches and every untouched block."""
        return self._compiler if self.scope == "blocks" else None

    def _scope(self) -> str:
        if self.values["scope"] != "auto":
            return self.values["scope"]
        return "model" if all(m.graph_safe for m in self.recipe) else "blocks"

    def describe(self) -> str:
        scope = getattr(self, "scope", None)
        return super().describe() + (f": compiled {'by regions' if scope == 'blocks' else 'whole'}" if scope else "")
