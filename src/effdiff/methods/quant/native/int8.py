"""Integer kernels on the denoiser: ``int8`` (W8A8, dynamic activations), ``int8wo`` / ``int4wo`` (weight-only).

The layers chosen by ``select.plan`` are swapped for the integer layers of ``kernels``; the original float
modules are kept and put back by ``remove``, so removal is bit-exact. ``save`` writes the quantized denoiser
(int8 / packed int4 codes, scales and the float layers left alone) to one safetensors file, and the same
method with ``load=<file>`` rebuilds it from that file instead of quantizing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from effdiff.context import StepContext
from effdiff.methods.quant.native import io, select
from effdiff.methods.quant.native.base import NativeQuant
from effdiff.methods.quant.native.kernels import (
    Int8DynamicConv2d,
    Int8DynamicLinear,
    WeightOnlyConv2d,
    WeightOnlyLinear,
    has_vnni,
    require_int8_engine,
)
from effdiff.methods.quant.native.select import Decision, summarize
from effdiff.registry import Paper, Param, RecipeError

INTEGER_ARITHMETIC = Paper("Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only "
                           "Inference", "1712.05877", "CVPR 2018")
FP8 = Paper("FP8 Formats for Deep Learning", "2209.05433", "arXiv 2022")
KBIT = Paper("The case for 4-bit precision: k-bit Inference Scaling Laws", "2212.09720", "ICML 2023")
LOAD = Param(str, "", help="rebuild from a file written by save() instead of quantizing the weights")
BACKEND = Param(str, "auto", choices=("auto", "effdiff", "torchao"),
                help="auto: effdiff's kernels on the CPU, torchao's on CUDA")
SELECT = Param(str, "measured", choices=("measured", "rule"),
               help="torchao: quantize a layer only where it measured faster on this device, or by the rule alone")
MIN_SPEEDUP = Param(float, 1.05, 0.0, 100.0, help="torchao, measured: a layer's least speed-up to be quantized")
MAX_ERROR = Param(float, 0.1, 0.0, 10.0, help="torchao, measured: a layer's largest relative output error")
TORCHAO = {"backend": BACKEND, "select": SELECT, "min_speedup": MIN_SPEEDUP, "max_error": MAX_ERROR}


class KernelQuant(NativeQuant):
    """Base of the integer-kernel methods: plan, swap, save, load, remove.

    They stack on ``bf16`` / ``fp16`` (applied first): the integer layers take the cast model's activations and
    return its dtype, so attention, norms and the layers the rule keeps run in the 16-bit float.
    """

    after = ("solver", "bf16", "fp16")
    exclusive = ("weights",)
    convs: ClassVar[bool] = True
    ao_kind: ClassVar[str] = ""  # torchao's kernel for this format ("" where torchao has none)

    def apply(self, pipe: Any, ctx: StepContext) -> None:
        self.model: nn.Module = self.adapter.model
        self.decisions: list[Decision] = []
        self.backend = self.resolve_backend(self.adapter.device)
        if self.backend == "torchao":
            self._torchao()
            return
        self.check_device(self.adapter.device)
        if self.values["load"]:
            self._load(Path(self.values["load"]).expanduser())
        else:
            self._quantize()

    def resolve_backend(self, device: torch.device) -> str:
        """effdiff's kernels or torchao's: ``auto`` takes torchao's on CUDA (effdiff's are CPU kernels);
        torchao where its kernel cannot run on ``device`` is refused with the reason."""
        from effdiff.methods.quant.native import ao

        backend = self.values.get("backend", "effdiff")
        if backend == "auto":
            backend = "torchao" if device.type == "cuda" and self.ao_kind else "effdiff"
        if backend == "torchao":
            reason = ao.unsupported(self.ao_kind, device)
            if reason:
                raise RecipeError(f"{self.name}: {reason}")
        return backend

    def _torchao(self) -> None:
        """torchao's kernel on the rule's linear layers: at once (``select=rule``, or the layers a saved plan
        lists), or on the denoiser's first call, where each is measured on its real input first."""
        from effdiff.methods.quant.native import ao

        settings = ao.config(self.ao_kind, self.values.get("group", 128))
        if self.values["load"]:
            names = io.read_plan(Path(self.values["load"]).expanduser(), self.name, self.model)
            self._install({name: ao.quantized_copy(self.model.get_submodule(name), settings) for name in names}, {})
            return
        rule = self.plan()
        names = [d.name for d in rule if d.quantize and isinstance(self.model.get_submodule(d.name), nn.Linear)]
        self.decisions = [d if d.name not in names and not d.quantize else
                          Decision(d.name, d.layer, False, "torchao quantizes linear layers only")
                          for d in rule if d.name not in names]
        if self.values["select"] == "rule":
            copies, kept = {}, {}
            for name in names:
                twin, refusal = ao.kernel_copy(self.model.get_submodule(name), settings)
                copies.update({name: twin} if twin is not None else {})
                kept.update({name: refusal} if twin is None else {})
            self._install(copies, kept)
            return
        self.measurements: list[ao.Measured] = []
        pending = {"names": names}

        @torch.compiler.disable
        def measure_first(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not pending:
                return
            names = pending.pop("names")  # the measuring call below re-enters this hook: nothing is pending then
            copies, kept, self.measurements = ao.measured_plan(
                module, names, settings, lambda: module(*args, **kwargs), self.values["min_speedup"],
                self.values["max_error"])
            self._install(copies, kept)

        self.patches.hook(self.model.register_forward_pre_hook(measure_first, with_kwargs=True))

    def _install(self, copies: dict[str, nn.Module], kept: dict[str, str]) -> None:
        for name, twin in copies.items():
            self.patches.module(self.model, name, twin)
            self.decisions.append(Decision(name, "linear", True, "quantized"))
        self.decisions += [Decision(name, "linear", False, reason) for name, reason in kept.items()]

    def check_device(self, device: torch.device) -> None:
        """Refuse a device the kernels do not run on (before any weight is touched)."""

    def convert(self, layer: nn.Module) -> nn.Module:
        raise NotImplementedError

    def plan(self) -> list[Decision]:
        least = self.values["min_features"]
        return select.plan(self.model, least, least, self.convs)

    def _quantize(self) -> None:
        self.decisions = self.plan()
        for d in self.decisions:
            if d.quantize:
                self.patches.module(self.model, d.name, self.convert(self.model.get_submodule(d.name)))

    def _load(self, path: Path) -> None:
        tensors, layers = io.read(path, self.name)
        for name, (cls, init) in layers.items():
            try:
                old = self.model.get_submodule(name)
            except AttributeError:
                raise RecipeError(f"{self.name}: {path} quantizes layer {name!r}, which this denoiser does not "
                                  "have (saved from another architecture?)") from None
            layer = cls(tensors[f"{name}.codes"], tensors[f"{name}.scale"], tensors.get(f"{name}.bias"), **init)
            self.patches.module(self.model, name, layer)
            self.decisions.append(Decision(name, type(old).__name__, True, "quantized"))
        io.load_float_tensors(self.model, tensors, set(layers), self.patches, path)

    def save(self, path: str | Path) -> int:
        """Write the quantized denoiser to ``path`` (safetensors); returns the file size in bytes. With torchao's
        kernels: the layers chosen (JSON) — dynamic quantization has no calibration, so the weights are
        re-quantized from the float ones exactly, and the measuring is what a plan saves."""
        if not getattr(self, "applied", False):
            raise RecipeError(f"{self.name}: save() needs the method applied to a pipeline first")
        if self.backend == "torchao":
            if not self.decisions:
                raise RecipeError(f"{self.name}: nothing chosen yet (the layers are measured on the first call)")
            return io.write_plan(Path(path), self.name, self.spec(), self.decisions,
                                 getattr(self, "measurements", []))
        return io.write(Path(path), self.model, self.name, self.spec(), self.quantized_layers())

    def quantized_layers(self) -> dict[str, nn.Module]:
        return {d.name: self.model.get_submodule(d.name) for d in self.decisions if d.quantize}

    def report(self) -> str:
        decisions = getattr(self, "decisions", None)
        return summarize(decisions) if decisions else ""


class Int8(KernelQuant):
    """W8A8: int8 weights (per output channel) x int8 activations quantized per call (per tensor).

    Paper: Jacob et al., "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
    Inference" (arXiv 1712.05877, CVPR 2018): affine uint8 activations, symmetric int8 weights, int32
    accumulation, float rescale. Here the activation range is taken per call (dynamic, no calibration);
    linears run fbgemm's kernel, convs oneDNN's direct int8 conv. Layers chosen by ``select.plan``; convs by
    default only where the CPU has VNNI (without it the int8 conv is not measured to win).
    """

    name = "int8"
    devices = frozenset({"cpu", "cuda"})
    ao_kind = "int8"
    paper = INTEGER_ARITHMETIC
    summary = "int8 weights x dynamic int8 activations on the wide linears (fbgemm) and convs (oneDNN, VNNI CPUs)"
    params = {
        "min_features": Param(int, 128, 1, 65536, help="linears narrower than this (in or out) stay fp32"),
        "min_channels": Param(int, 64, 1, 65536, help="convs narrower than this (in or out) stay fp32"),
        "convs": Param(str, "auto", choices=("auto", "true", "false"),
                       help="quantize convs too (oneDNN int8 conv); auto: where the CPU has VNNI, on which it wins"),
        "load": LOAD,
        **TORCHAO,
    }

    def check_device(self, device: torch.device) -> None:
        require_int8_engine(self.name, device)

    def plan(self) -> list[Decision]:
        convs = {"true": True, "false": False, "auto": has_vnni()}[self.values["convs"]]
        return select.plan(self.model, self.values["min_features"], self.values["min_channels"], convs)

    def convert(self, layer: nn.Module) -> nn.Module:
        if isinstance(layer, nn.Linear):
            return Int8DynamicLinear.from_float(layer)
        return Int8DynamicConv2d.from_float(layer)


class Int8WeightOnly(KernelQuant):
    """int8 weights (per output channel, round to nearest), dequantized per call: 4x smaller weights.

    Paper: Dettmers & Zettlemoyer, "The case for 4-bit precision: k-bit Inference Scaling Laws" (arXiv
    2212.09720, ICML 2023), whose baseline is exactly this round-to-nearest weight-only quantization.
    Compute stays fp32, so it saves memory and disk, not time (the dequantization costs a little).
    """

    name = "int8wo"
    devices = frozenset({"cpu", "cuda"})
    ao_kind = "int8wo"
    paper = KBIT
    summary = "int8 weight-only (memory and size; compute stays float)"
    params = {
        "min_features": Param(int, 1, 1, 65536, help="layers narrower than this (in or out) stay float"),
        "load": LOAD,
        **TORCHAO,
    }

    def convert(self, layer: nn.Module) -> nn.Module:
        if isinstance(layer, nn.Linear):
            return WeightOnlyLinear.from_float(layer, 8)
        return WeightOnlyConv2d.from_float(layer, 8)


class Int4WeightOnly(KernelQuant):
    """int4 weights in groups of ``group`` inputs with one scale each, two codes per byte: ~7x smaller.

    Paper: Dettmers & Zettlemoyer (arXiv 2212.09720): at 4 bits, small blocks (64-128) with their own scale
    are what keeps round-to-nearest usable. A conv's fan-in (in x kh x kw) is grouped like a linear's inputs,
    zero-padded to a multiple of ``group``.
    """

    name = "int4wo"
    devices = frozenset({"cpu", "cuda"})
    ao_kind = "int4wo"
    paper = KBIT
    summary = "int4 weight-only in groups (memory and size; compute stays float)"
    params = {
        "group": Param(int, 64, choices=(32, 64, 128, 256), help="inputs sharing one scale"),
        "min_features": Param(int, 1, 1, 65536, help="layers narrower than this (in or out) stay float"),
        "load": LOAD,
        **TORCHAO,
    }

    def convert(self, layer: nn.Module) -> nn.Module:
        cls = WeightOnlyLinear if isinstance(layer, nn.Linear) else WeightOnlyConv2d
        return cls.from_float(layer, 4, self.values["group"])


class Fp8(KernelQuant):
    """float8 (e4m3) weights × float8 activations quantized per call, one scale per row of each (torchao's
    ``Float8DynamicActivationFloat8WeightConfig`` with ``PerRow``): the FP8 tensor cores of Ada/Hopper/Blackwell
    GPUs run the matmul, so it is a real speed-up, not a simulation. Each linear layer is kept in its 16-bit float
    where it measured no faster on the device or its output moved more than ``max_error`` (``ao.measured_plan``);
    timestep embeddings and the first/last layers stay float by rule. Stack it after ``bf16``/``fp16`` and
    before ``compile`` (torchao's float8 kernels are fastest compiled).

    Paper: Micikevicius et al., "FP8 Formats for Deep Learning" (arXiv 2209.05433).
    """

    name = "fp8"
    devices = frozenset({"cuda"})
    ao_kind = "fp8"
    paper = FP8
    summary = "float8 weights x dynamic float8 activations (torchao, FP8 GPUs), kept per layer where it wins"
    params = {
        "min_features": Param(int, 256, 1, 65536, help="linears narrower than this (in or out) stay float"),
        "load": Param(str, "", help="quantize exactly the layers a plan written by save() lists (no measuring)"),
        "select": SELECT,
        "min_speedup": MIN_SPEEDUP,
        "max_error": MAX_ERROR,
    }

    def resolve_backend(self, device: torch.device) -> str:
        from effdiff.methods.quant.native import ao

        reason = ao.unsupported(self.ao_kind, device)
        if reason:
            raise RecipeError(f"{self.name}: {reason}")
        return "torchao"
