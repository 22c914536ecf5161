"""What every compressed-model method shares: finding the model ``effdiff compress`` wrote beside the pipeline's,
checking it was made from these weights, and putting it into the pipeline's own denoiser object through the undo
log — layers removed, tensors replaced, widths set (``effdiff.compress.structure``) — so the pipeline, the adapter
and every later method see one module, the recipe stacks with solvers, caches, quantization and ``compile``, and
``remove()`` puts the original back bit for bit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from effdiff.registry import Method, Param, RecipeError, refusal

PATH = Param(str, "", help="a folder written by effdiff compress (default: beside the model)")


class CompressedMethod(Method):
    """Base of the ``prune`` family; a subclass names its importance rules (``importances``, the first the
    default)."""

    tried_by_tune = True  # a compressed checkpoint: no knob to search, still a candidate

    family = "prune"
    exclusive = ("denoiser weights",)
    before = ("cache", "tokens", "quant", "parallel", "compile")
    importances: ClassVar[tuple[str, ...]] = ()

    def folder(self, pipe: Any) -> Path:
        from effdiff.distill.store import given_folder, model_folder, model_reference

        folder = given_folder(self.name, self.values["path"], "compress")
        if folder is not None:
            return folder
        name = self.folder_name()
        base = model_folder(pipe)
        if base is None or not (base / "compress" / name).is_dir():
            raise RecipeError(f"{self.name}: this model has no compressed denoiser {name!r} yet; make one with "
                              f"`effdiff compress {model_reference(pipe)} --method {self.name}{self.command_flags()}` "
                              "(or pass path=FOLDER)")
        return base / "compress" / name

    def unavailable(self, pipe: Any) -> str | None:
        return refusal(lambda: self.folder(pipe))

    def folder_name(self) -> str:
        from effdiff.compress.trainer import compressed_folder

        return compressed_folder(self.name, self.values["macs"], self.values["importance"])

    def command_flags(self) -> str:
        """The ``effdiff compress`` flags that make the model this recipe asks for."""
        return f" --macs {self.values['macs']:g}" + ("" if self.values["importance"] == self.importances[0]
                                                      else f" --importance {self.values['importance']}")

    def apply(self, pipe: Any, ctx: Any) -> None:
        from safetensors.torch import load_file

        from effdiff.compress.structure import BlockPlan, apply_block_plan, put_structure, remove_layers
        from effdiff.compress.trainer import RECORD, WEIGHTS_FILE
        from effdiff.methods.solvers.schedule import model_fingerprint

        folder = self.folder(pipe)
        if not (folder / RECORD).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise RecipeError(f"{self.name}: {folder} lacks {RECORD} or {WEIGHTS_FILE}")
        record = json.loads((folder / RECORD).read_text())
        if record.get("method") != self.name:
            raise RecipeError(f"{self.name}: {folder} holds a {record.get('method')!r} model, not a {self.name!r} one")
        model = self.adapter.model
        if record.get("teacher_fingerprint") != model_fingerprint(model):
            raise RecipeError(f"{self.name}: the model in {folder} was pruned from other weights than this "
                              f"pipeline's {type(model).__name__} (teacher {record.get('teacher')!r})")
        try:
            remove_layers(self.patches, model, record.get("removed", []))
            apply_block_plan(self.patches, model, BlockPlan.of(record.get("blocks")))
            put_structure(self.patches, model, load_file(str(folder / WEIGHTS_FILE)), record["widths"])
        except (ValueError, AttributeError) as exc:
            raise RecipeError(f"{self.name}: {exc}") from None
        self.source, self.macs_fraction = str(folder), record.get("macs_fraction")

    def describe(self) -> str:
        return super().describe() + f" from {self.source} ({self.macs_fraction:.0%} of the MACs)"
