"""The one base class of the simulated low-bit methods: calibrate (or load, or reuse), patch, restore."""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from typing import Any, ClassVar

import torch
from torch import nn

from effdiff.context import StepContext
from effdiff.methods.quant.lowbit.fake import BITS, FakeQuantLayer, Observer, check_bits
from effdiff.methods.quant.lowbit.observe import (
    LayerInputs,
    calibration_prompts,
    io_layers,
    run_pipeline,
    split_points,
    target_layers,
)
from effdiff.methods.quant.lowbit.packed import LayerQuant, load, model_bytes, save
from effdiff.methods.solvers.schedule import model_fingerprint
from effdiff.registry import Method, Param, RecipeError

MEMO_SIZE = 4  # calibrations kept in-process, so re-applying a recipe (bench repetitions, stacking) is free
_MEMO: OrderedDict[str, tuple[dict[str, LayerQuant], dict[str, Any]]] = OrderedDict()


def forget_calibrations() -> None:
    """Empty the in-process memo, so the next apply calibrates from scratch (tests of determinism, loading)."""
    _MEMO.clear()


class QuantMethod(Method):
    """Shared lifecycle of the simulated low-bit methods: calibrate (or load, or reuse), patch, restore.

    Subclasses implement ``calibrate(pipe) -> {layer name: LayerQuant}``.
    """

    family = "quant"
    devices = frozenset({"cpu"})  # grids and calibration statistics are built on CPU tensors; untested elsewhere
    after = ("solver",)
    before = ("cache", "tokens")
    exclusive = ("weights", "float dtype")  # grids and reconstruction are float32 maths: no bf16 underneath
    common: ClassVar[dict[str, Param]] = {
        "wbits": Param(int, 8, choices=BITS, help="weight bits; 16 or 32 keep weights in float"),
        "abits": Param(int, 8, choices=BITS, help="activation bits; 16 or 32 keep activations in float"),
        "prompts": Param(int, 4, 1, 256, help="calibration prompts (sampled in one pipeline call)"),
        "seed": Param(int, 0, 0, 2**31 - 1, help="seed of the calibration samples"),
        "steps": Param(int, 0, 0, 1000, help="calibration sampling steps (0: the pipeline's or the solver's)"),
        "calibration": Param(str, "", help="load this saved calibration (.safetensors) instead of calibrating"),
    }

    def __init__(self, **values: Any) -> None:
        super().__init__(**values)
        check_bits(self.name, self.values["wbits"], self.values["abits"])
        self.layers: dict[str, LayerQuant] = {}
        self.info: dict[str, Any] = {}

    # --- lifecycle -----------------------------------------------------------------------------------
    def apply(self, pipe: Any, ctx: StepContext) -> None:
        self.ctx = ctx
        model = self.adapter.model
        fingerprint = model_fingerprint(model)
        if self.values["calibration"]:
            self.layers, self.info = self._load(self.values["calibration"], fingerprint)
        else:
            key = self._memo_key(pipe, fingerprint)
            if key in _MEMO:
                self.layers, self.info = _MEMO[key]
                _MEMO.move_to_end(key)
            else:
                start = time.perf_counter()
                with torch.no_grad():
                    layers = self.calibrate(pipe)
                info = {"method": self.name, "values": self._settings(), "fingerprint": fingerprint,
                        "seconds": round(time.perf_counter() - start, 3), **self.calibration_notes()}
                self.layers, self.info = layers, info
                _MEMO[key] = (layers, info)
                while len(_MEMO) > MEMO_SIZE:
                    _MEMO.popitem(last=False)
        modules = dict(model.named_modules())
        for name, record in self.layers.items():
            self.patches.attr(modules[name], "forward", self.make_layer(name, record, modules[name], ctx))

    def make_layer(self, name: str, record: LayerQuant, module: nn.Module, ctx: StepContext) -> FakeQuantLayer:
        """The fake-quant forward installed on ``module``; subclasses with extra stored state extend it."""
        return record.layer(module, ctx)

    def calibrate(self, pipe: Any) -> dict[str, LayerQuant]:
        raise NotImplementedError

    def calibration_notes(self) -> dict[str, Any]:
        """Extra facts a subclass records about its calibration (stored with it)."""
        return {}

    # --- saving --------------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write the calibration (packed codes, grids, settings, model fingerprint) to ``path``."""
        if not self.layers:
            raise RuntimeError(f"{self.name}: nothing to save before the method is applied")
        save(path, self.layers, self.info)

    def size(self) -> dict[str, int]:
        """Stored bytes of the quantized denoiser vs its float32 size."""
        return model_bytes(self.adapter.model, self.layers)

    def _settings(self) -> dict[str, Any]:
        return {k: v for k, v in self.values.items() if k != "calibration"}

    def _load(self, path: str, fingerprint: str) -> tuple[dict[str, LayerQuant], dict[str, Any]]:
        layers, info = load(path, self.name)
        if info.get("fingerprint") != fingerprint:
            raise RecipeError(f"{self.name}: {path} was calibrated for other weights")
        if info.get("values") != self._settings():
            raise RecipeError(f"{self.name}: {path} was calibrated with {info.get('values')}, "
                              f"not {self._settings()}")
        names = dict(self.adapter.model.named_modules())
        missing = [n for n in layers if n not in names]
        if missing:
            raise RecipeError(f"{self.name}: {path} names layers this model lacks, e.g. {missing[0]}")
        return layers, info

    def _memo_key(self, pipe: Any, fingerprint: str) -> str:
        handle = pipe.__dict__.get("effdiff")
        before = [m.spec() for m in getattr(handle, "methods", ())]
        scheduler = getattr(pipe, "scheduler", None)
        config = dict(getattr(scheduler, "config", {}) or {})
        return json.dumps([self.name, self._settings(), fingerprint, before, type(scheduler).__name__, config],
                          sort_keys=True, default=str)

    # --- shared calibration steps ---------------------------------------------------------------------
    def observe(self, pipe: Any, keep_values: bool, per_channel: bool = False,
                split: bool = False) -> tuple[dict[str, nn.Module], dict[str, Observer], list[str], dict[str, int]]:
        """One calibration pipeline call with an observer on every target layer's input.

        Returns the target layers, their observers, the names of the layers to quantize (in execution
        order, input and output layers excluded) and, with ``split``, the U-Net concat split points.
        """
        layers = target_layers(self.adapter)
        observers: dict[str, Observer] = {}
        splits, unhook = split_points(self.adapter) if split else ({}, lambda: None)

        def visit(name: str, module: nn.Module, x: torch.Tensor) -> None:
            if name not in observers:
                segments = [0, splits[name], module.in_channels] if name in splits else None
                observers[name] = Observer(isinstance(module, nn.Conv2d), segments, keep_values, per_channel)
            observers[name].update(x)

        try:
            with LayerInputs(layers, visit) as seen:
                conditions = calibration_prompts(pipe, self.values["prompts"])
                run_pipeline(pipe, conditions, self.values["seed"], self.values["steps"])
        finally:
            unhook()
        keep = io_layers(self.adapter, seen.order, layers)
        order = [n for n in seen.order if n not in keep]
        if not order:
            raise RecipeError(f"{self.name}: no Linear or Conv2d layer of {type(self.adapter.model).__name__} ran "
                              "during calibration")
        self._kept_float = sorted(keep)
        return layers, observers, order, splits

    def describe(self) -> str:
        w, a = self.values["wbits"], self.values["abits"]
        text = f"{super().describe()} [simulated fake-quant (no low-bit kernel), W{w}A{a}"
        if self.layers:
            size = self.size()
            text += (f"; {len(self.layers)} layers quantized; stored size {size['bytes'] / 2**20:.2f} MiB = "
                     f"{size['bytes'] / size['fp32_bytes']:.3f} x fp32; trained: calibration "
                     f"{self.info.get('seconds', float('nan')):.1f} s")
        return text + "]"
