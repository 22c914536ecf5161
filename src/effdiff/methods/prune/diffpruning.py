"""``diffpruning``: run a pipeline with the structurally pruned, finetuned denoiser ``effdiff compress`` made.

The compressed model is stored as its difference from the original (``effdiff.compress.structure``) and put into
the pipeline's own denoiser object through the undo log: every changed tensor replaced (smaller), every width
attribute set. The pipeline, the adapter and every later method see one module, so the recipe stacks with
solvers, caches, quantization and ``compile``, and ``remove()`` puts the original tensors back bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from effdiff.registry import Method, Paper, Param, RecipeError

DIFF_PRUNING = Paper("Structural Pruning for Diffusion Models", "2305.10924", "NeurIPS 2023")
DEPGRAPH = Paper("DepGraph: Towards Any Structural Pruning", "2301.12900", "CVPR 2023")


class DiffPruning(Method):
    """A denoiser pruned to a MAC budget by Diff-Pruning's Taylor importance, then finetuned.

    Paper: Structural Pruning for Diffusion Models (Fang et al., arXiv 2305.10924); the dependency graph that
    removes coupled channels together: DepGraph (Fang et al., arXiv 2301.12900, the torch-pruning library).
    """

    name = "diffpruning"
    family = "prune"
    paper = DIFF_PRUNING
    also = (DEPGRAPH,)
    summary = "structurally pruned + finetuned denoiser (Diff-Pruning): fewer channels and heads, dense and smaller"
    params = {"macs": Param(float, 0.5, 0.01, 0.99, help="which compressed model: its MACs as a fraction"),
              "importance": Param(str, "taylor", choices=("taylor", "magnitude"),
                                  help="taylor (Diff-Pruning) or magnitude (the naive baseline)"),
              "path": Param(str, "", help="a folder written by effdiff compress (default: beside the model)")}
    exclusive = ("denoiser weights",)
    before = ("cache", "tokens", "quant", "parallel", "compile")

    def folder(self, pipe: Any) -> Path:
        from effdiff.compress.trainer import compressed_folder
        from effdiff.distill.store import model_folder

        if self.values["path"]:
            folder = Path(self.values["path"]).expanduser()
            if not folder.is_dir():
                raise RecipeError(f"{self.name}: path {str(folder)!r} is not a folder (one written by effdiff "
                                  "compress)")
            return folder
        name = compressed_folder(self.name, self.values["macs"], self.values["importance"])
        base = model_folder(pipe)
        if base is None or not (base / "compress" / name).is_dir():
            model = getattr(pipe, "effdiff_model_ref", None) or getattr(pipe, "effdiff_model_name", None) or "MODEL"
            flags = f" --macs {self.values['macs']:g}" + (
                "" if self.values["importance"] == "taylor" else f" --importance {self.values['importance']}")
            raise RecipeError(f"{self.name}: this model has no compressed denoiser {name!r} yet; make one with "
                              f"`effdiff compress {model}{flags}` (or pass path=FOLDER)")
        return base / "compress" / name

    def apply(self, pipe: Any, ctx: Any) -> None:
        from safetensors.torch import load_file

        from effdiff.compress.structure import put_structure
        from effdiff.compress.trainer import RECORD, WEIGHTS_FILE
        from effdiff.methods.solvers.schedule import model_fingerprint

        folder = self.folder(pipe)
        if not (folder / RECORD).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise RecipeError(f"{self.name}: {folder} lacks {RECORD} or {WEIGHTS_FILE}")
        record = json.loads((folder / RECORD).read_text())
        model = self.adapter.model
        if record.get("teacher_fingerprint") != model_fingerprint(model):
            raise RecipeError(f"{self.name}: the model in {folder} was pruned from other weights than this "
                              f"pipeline's {type(model).__name__} (teacher {record.get('teacher')!r})")
        try:
            put_structure(self.patches, model, load_file(str(folder / WEIGHTS_FILE)), record["widths"])
        except ValueError as exc:
            raise RecipeError(f"{self.name}: {exc}") from None
        self.source, self.macs_fraction = str(folder), record.get("macs_fraction")

    def describe(self) -> str:
        return super().describe() + f" from {self.source} ({self.macs_fraction:.0%} of the MACs)"
