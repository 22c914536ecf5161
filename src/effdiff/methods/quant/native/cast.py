"""``bf16`` / ``fp16``: run the denoiser (optionally the VAE and text encoder) in a 16-bit float.

What a plain ``pipe.to(torch.bfloat16)`` gets wrong, and what this does instead:
- the pipeline's own math (initial noise, scheduler steps, guidance) would run in 16 bits too; here every
  cast component still *reports* float32 (``dtype``), receives float32 and returns float32: tensors are cast
  at its boundary, so latents and the solver stay float32;
- numerically sensitive modules can stay float32 (``keep``): the timestep/condition embeddings (one small
  matmul per call that conditions everything) and, optionally, the normalisation layers;
- ``remove`` puts back the original float32 ``Parameter`` objects (kept, not round-tripped), bit for bit;
- a device that only emulates the dtype is refused: on a CPU without AVX512-BF16/AMX, bf16 convs and matmuls
  convert element by element and run tens of times slower than fp32 (``emulated=true`` allows it, e.g.
  to halve weight memory, or to measure the dtype's error).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from effdiff.context import StepContext
from effdiff.methods.quant.native.base import NativeQuant
from effdiff.methods.quant.native.kernels import native_float
from effdiff.methods.quant.native.select import embedding_modules
from effdiff.patches import PatchLog
from effdiff.registry import Paper, Param, RecipeError

MIXED_PRECISION = Paper("Mixed Precision Training", "1710.03740", "ICLR 2018")
BFLOAT16 = Paper("A Study of BFLOAT16 for Deep Learning Training", "1905.12322", "arXiv 2019")
NORMS = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)
KEEP = ("none", "embed", "norms", "all")


def convert(obj: Any, src: torch.dtype, dst: torch.dtype) -> Any:
    """``obj`` with every ``src`` tensor inside (tuples, lists, dicts, diffusers/transformers outputs) as ``dst``.

    A ``src`` dtype passed as a value becomes ``dst`` too: diffusers' embeddings take ``hidden_dtype`` and cast
    to it inside, which would undo a float32 boundary.
    """
    if isinstance(obj, torch.dtype):
        return dst if obj == src else obj
    if isinstance(obj, torch.Tensor):
        return obj.to(dst) if obj.dtype == src else obj
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(convert(v, src, dst) for v in obj)
    if isinstance(obj, list):
        return [convert(v, src, dst) for v in obj]
    if isinstance(obj, Mapping):
        if hasattr(obj, "__setitem__") and type(obj) is not dict:  # BaseOutput / ModelOutput: in place
            for key in list(obj.keys()):
                obj[key] = convert(obj[key], src, dst)
            return obj
        return {k: convert(v, src, dst) for k, v in obj.items()}
    return obj


def boundary(module: nn.Module, inside: torch.dtype, outside: torch.dtype, swaps: PatchLog,
             exempt: tuple[str, ...] = ()) -> None:
    """Floating inputs arrive as ``inside``, outputs leave as ``outside``; ``exempt`` arguments pass as they are."""
    names = list(inspect.signature(module.forward).parameters)

    def pre(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args = tuple(a if i < len(names) and names[i] in exempt else convert(a, outside, inside)
                     for i, a in enumerate(args))
        return args, {k: v if k in exempt else convert(v, outside, inside) for k, v in kwargs.items()}

    def post(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        return convert(out, inside, outside)

    swaps.hook(module.register_forward_pre_hook(pre, with_kwargs=True))
    swaps.hook(module.register_forward_hook(post, with_kwargs=True))


_REPORTING: dict[type, type] = {}


def reporting_class(base: type) -> type:
    """A same-named subclass whose ``dtype`` is the one the pipeline should see (the original float32)."""
    if base not in _REPORTING:
        _REPORTING[base] = type(base.__name__, (base,), {
            "dtype": property(lambda self: self.__dict__["_effdiff_dtype"]),
            "__module__": base.__module__, "__qualname__": base.__qualname__,
        })
    return _REPORTING[base]


def cast_tensors(module: nn.Module, dtype: torch.dtype, skip: set[int], swaps: PatchLog) -> int:
    """Cast floating parameters/buffers of ``module`` (except those of modules in ``skip``); ties stay tied."""
    done: dict[int, torch.Tensor] = {}
    count = 0
    for sub in module.modules():
        if id(sub) in skip:
            continue
        for store in (sub._parameters, sub._buffers):
            for name, tensor in list(store.items()):
                if tensor is None or not tensor.is_floating_point() or tensor.dtype == dtype:
                    continue
                if id(tensor) not in done:
                    data = tensor.detach().to(dtype)
                    new = nn.Parameter(data, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else data
                    done[id(tensor)] = new
                    count += tensor.numel()
                swaps.tensor(sub, name, done[id(tensor)])
    return count


class CastMethod(NativeQuant):
    """Base of ``bf16`` / ``fp16``."""

    exclusive = ("float dtype",)  # not "weights": the integer kernels stack on a cast model (bf16+int8)
    dtype: ClassVar[torch.dtype] = torch.float32
    params = {
        "keep": Param(str, "embed", choices=KEEP, help="modules kept in float32"),
        "vae": Param(bool, True, help="cast the VAE too (if the pipeline has one)"),
        "text_encoder": Param(bool, False, help="cast the text encoder too"),
        "emulated": Param(bool, False, help="allow a device without native kernels for the dtype (slow)"),
    }

    def apply(self, pipe: Any, ctx: StepContext) -> None:
        adapter = self.adapter
        device = adapter.device
        if not self.values["emulated"] and not native_float(device, self.dtype):
            raise RecipeError(f"{self.name}: this {device.type} has no native {self.dtype} kernels (it would "
                              f"emulate them, slower than float32); pass {self.name}:emulated=true to run anyway")
        self.kept: list[str] = []
        self._cast_component(adapter.model, keep_fp32=True)
        for attr in ("vae", "text_encoder"):
            component = getattr(pipe, attr, None)
            if self.values[attr] and isinstance(component, nn.Module):
                self._cast_component(component, keep_fp32=False)
        if self.values["text_encoder"] and isinstance(getattr(pipe, "_caption_cache", None), dict):
            self._forget_captions(pipe)

    def _forget_captions(self, pipe: Any) -> None:
        """The bundled pipelines cache caption states: drop them now and again on remove (another precision)."""
        pipe._caption_cache.clear()
        self.patches.call(pipe._caption_cache.clear)

    def _kept_modules(self, model: nn.Module) -> list[str]:
        keep = self.values["keep"]
        names = embedding_modules(model) if keep in ("embed", "all") else []
        if keep in ("norms", "all"):
            names += [n for n, m in model.named_modules() if isinstance(m, NORMS)]
        return names

    def _cast_component(self, model: nn.Module, keep_fp32: bool) -> None:
        original = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        if original == self.dtype:
            return
        kept = self._kept_modules(model) if keep_fp32 else []
        skip = {id(m) for name in kept for m in model.get_submodule(name).modules()}
        cast_tensors(model, self.dtype, skip, self.patches)
        for name in kept:
            boundary(model.get_submodule(name), original, self.dtype, self.patches)
        self.kept += kept
        # pipelines call a VAE through decode()/encode(), not forward: guard each child it runs
        entries = list(model.children()) if hasattr(model, "decode") else [model]
        for entry in entries:  # the timestep stays float32: diffusers builds its sinusoid from it in float32
            boundary(entry, self.dtype, original, self.patches, exempt=("timestep", "timesteps"))
        if hasattr(type(model), "dtype"):
            model.__dict__["_effdiff_dtype"] = original
            self.patches.klass(model, reporting_class(type(model)))
            self.patches.call(lambda: model.__dict__.pop("_effdiff_dtype", None))

    def report(self) -> str:
        kept = getattr(self, "kept", None)
        return f"{len(kept)} modules kept float32" if kept is not None else ""


class BF16(CastMethod):
    """bfloat16 weights and activations, float32 at the boundary and in the kept modules.

    Paper: Kalamkar et al., "A Study of BFLOAT16 for Deep Learning Training" (arXiv 1905.12322): bf16 keeps
    float32's exponent range, so no loss scaling or overflow guard is needed, only float32 where rounding
    accumulates (here the embeddings; norms optionally).
    """

    name = "bf16"
    dtype = torch.bfloat16
    paper = BFLOAT16
    summary = "bfloat16 denoiser (and VAE), float32 latents, solver and embeddings"


class FP16(CastMethod):
    """float16 weights and activations, float32 at the boundary and in the kept modules.

    Paper: Micikevicius et al., "Mixed Precision Training" (arXiv 1710.03740, ICLR 2018): half precision
    with float32 kept where the narrow range or short mantissa hurts (reductions, normalisation, the master
    copy of the weights — here the pipeline's latents and solver).
    """

    name = "fp16"
    dtype = torch.float16
    paper = MIXED_PRECISION
    summary = "float16 denoiser (and VAE), float32 latents, solver and embeddings"
