"""The kernels of one denoiser call at a given size, traced on the meta device (no memory, no weights): each aten
op's FLOPs (torch's own formulas, ours for attention) and the bytes it reads and writes — a roofline per kernel —
and the activations DistriFusion would exchange."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from effdiff.eval.cost import attention_flops, sdpa_arguments


@dataclass(frozen=True)
class Kernel:
    flops: int
    bytes: int
    sequence: bool = False  # the fused attention of an attention a sequence split makes whole


@dataclass
class Trace:
    """One call's kernels, and per exchanged layer the bytes of the whole activation DistriFusion gathers
    (self-attention keys and values; a convolution's two boundary rows per patch edge; GroupNorm statistics).
    ``sequence_bytes``: the keys' and values' bytes of every attention a sequence split makes whole (an MMDiT's
    text keys included), ``sequence_attentions`` their fused attentions; empty where the model has no sequence split."""

    kernels: list[Kernel] = field(default_factory=list)
    kv_bytes: list[int] = field(default_factory=list)
    halo_bytes_per_edge: list[int] = field(default_factory=list)
    norm_bytes: list[int] = field(default_factory=list)
    output_bytes: int = 0
    split: str | None = None  # the adapter's patch layout ("rows", "tokens"), None where it has none
    sequence_bytes: list[int] = field(default_factory=list)
    inside_sequence_attention: bool = False

    @property
    def flops(self) -> int:
        return sum(k.flops for k in self.kernels)

    @property
    def sequence_attentions(self) -> int:
        return sum(k.sequence for k in self.kernels)


def _size(value: Any) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


class KernelRecorder(TorchDispatchMode):
    """Records every non-view aten op as one kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: list[Kernel] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if func.is_view or packet in (torch.ops.aten.detach, torch.ops.aten._to_copy):
            return out
        flops = int(flop_registry[packet](*args, **kwargs, out_val=out)) if packet in flop_registry else 0
        moved = sum(_size(v) for v in tree_leaves((args, kwargs))) + sum(_size(v) for v in tree_leaves(out))
        self.kernels.append(Kernel(flops, moved))
        return out


class FusedAttention(TorchFunctionMode):
    """``scaled_dot_product_attention`` as the one fused kernel a GPU runs (flash / memory-efficient): on the meta
    device it would decompose into matmuls and a softmax over the whole score matrix, whose bytes no GPU moves."""

    def __init__(self, kernels: list[Kernel], trace: Trace | None = None) -> None:
        super().__init__()
        self.kernels, self.trace = kernels, trace

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is not F.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        given = sdpa_arguments(args, kwargs)
        query, key, value = given["query"], given["key"], given["value"]
        out = query.new_empty(*query.shape[:-1], value.shape[-1])
        flops = attention_flops(query.shape, key.shape, value.shape)
        sequence = self.trace is not None and self.trace.inside_sequence_attention
        self.kernels.append(Kernel(flops, sum(_size(t) for t in (query, key, value, out)), sequence))
        return out


def _exchange_hooks(model: nn.Module, trace: Trace, adapter: Any) -> list[Any]:
    """Forward hooks recording what DistriFusion would exchange at each layer, at the whole image's size."""
    handles = []
    layout = adapter.patch_layout()
    if layout is not None and layout.split == "rows":
        from effdiff.methods.parallel.patch_layers import halo_rows

        for module in model.modules():
            if isinstance(module, nn.Conv2d) and module.kernel_size[0] > 1 and module is not layout.entry:
                def conv_hook(m: nn.Conv2d, args: tuple, _out: Any) -> None:
                    x = args[0]
                    trace.halo_bytes_per_edge.append(sum(halo_rows(m)) * _size(x) // x.shape[-2])
                handles.append(module.register_forward_hook(conv_hook))
            elif isinstance(module, nn.GroupNorm):
                def norm_hook(m: nn.GroupNorm, args: tuple, _out: Any) -> None:
                    trace.norm_bytes.append(args[0].shape[0] * m.num_groups * 2 * 4)
                handles.append(module.register_forward_hook(norm_hook))
    for _, attn in adapter.self_attentions():
        for projection in (attn.to_k, attn.to_v):
            handles.append(projection.register_forward_hook(lambda _m, _a, out: trace.kv_bytes.append(_size(out))))
    return handles + _sequence_hooks(trace, adapter)


def _sequence_hooks(trace: Trace, adapter: Any) -> list[Any]:
    """Forward hooks recording the keys and values (image and text) each attention a sequence split makes whole
    exchanges, at the whole sequence's size."""
    layout = adapter.sequence_layout()
    if layout is None:
        return []

    def enter(*_: Any) -> None:
        trace.inside_sequence_attention = True

    def leave(*_: Any) -> None:
        trace.inside_sequence_attention = False

    handles = []
    for _, attn in layout.attentions:
        handles += [attn.register_forward_pre_hook(enter), attn.register_forward_hook(leave)]
        for name in ("to_k", "to_v", "add_k_proj", "add_v_proj"):
            if (projection := getattr(attn, name, None)) is not None:
                handles.append(projection.register_forward_hook(
                    lambda _m, _a, out: trace.sequence_bytes.append(_size(out))))
    return handles


def trace_call(model: nn.Module, call: dict[str, Any], args: tuple = ()) -> Trace:
    """Run ``model(*args, **call)`` (meta tensors, or real ones) recording its kernels and exchanged activations."""
    from effdiff.adapters import adapter_for

    adapter = adapter_for(model)
    layout = adapter.patch_layout()
    trace = Trace(split=layout.split if layout is not None else None)
    handles = _exchange_hooks(model, trace, adapter)
    recorder = KernelRecorder()
    try:
        with torch.no_grad(), recorder, FusedAttention(recorder.kernels, trace):
            out = model(*args, **call)
    finally:
        for handle in handles:
            handle.remove()
    trace.kernels = recorder.kernels
    sample = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
    trace.output_bytes = _size(sample)
    return trace
