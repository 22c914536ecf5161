"""Which layers get a low-precision kernel, and why the others do not — one explicit, tested rule.

A layer is quantized only if all of these hold, checked in this order (the first that fails is the reason):

1. it is an ``nn.Linear``, or an ``nn.Conv2d`` with groups 1 and zero padding (what the kernels implement);
2. it is not inside a timestep / conditioning embedding (``embedding_modules``): those run on a handful of
   rows per call, so quantizing them saves nothing, and the whole network is conditioned on their output;
3. it is not the first or last layer (``conv_in``, ``conv_out``, the patch embedding, the final ``proj_out``):
   few channels, so little time, and the layers where quantization error is least averaged out;
4. both widths (in and out features / channels) are at least ``min_features`` for a linear, ``min_channels``
   for a conv: narrow layers are bound by the per-call activation quantization, not by the matmul.
   Measured (2 threads, ``benchmarks/quant_peers.py --sections kernels``): on an AVX2-only CPU a 2048-row
   linear runs 0.45x fp32 at width 32, 0.98x at 64, 1.5x at 128, 1.7x at 320x1280; on an AVX512-VNNI CPU
   1.0x at 64, 1.5x at 128, 1.2-3.8x from 320 up (0.7x at 96 wide with 256 rows): hence 128 on both. Convs
   run oneDNN's direct int8 conv: on the VNNI CPU 1.0x fp32 at 32 channels, 1.6x at 64, 2.7-3.9x at 320-1280,
   so ``int8`` quantizes convs by default only where the CPU has VNNI; ``min_channels`` (64) keeps the
   32-channel ones out, where the kernel is no faster. Even 64 channels do not pay on a whole small model:
   tiny-sd (32/64/64 channels) runs 0.94-1.04x with its 64-channel convs in int8 (``quant_batch.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

FIRST_LAST = ("conv_in", "conv_out", "pos_embed.proj", "proj_out", "proj_out_2")
EMBEDDING_CLASSES = ("AdaLayerNormSingle",)


@dataclass(frozen=True)
class Decision:
    """One layer's fate: quantize or keep, and the rule that decided."""

    name: str
    layer: str
    quantize: bool
    reason: str


def embedding_modules(model: nn.Module) -> list[str]:
    """Outermost timestep / conditioning embeddings (``TimestepEmbedding``, ``AdaLayerNormSingle``, ...)."""
    found: list[str] = []
    for name, module in model.named_modules():
        cls = type(module).__name__
        if not name or any(name.startswith(f + ".") for f in found):
            continue
        if "Timestep" in cls or cls in EMBEDDING_CLASSES:
            found.append(name)
    return found


def _inside(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def decide(name: str, module: nn.Module, embeddings: list[str], min_features: int,
           min_channels: int) -> Decision | None:
    """The rule for one module; ``None`` for modules that are not linear/conv layers at all."""
    if isinstance(module, nn.Linear):
        layer, widths = "linear", (module.in_features, module.out_features)
    elif isinstance(module, nn.Conv2d):
        layer, widths = f"conv{module.kernel_size[0]}x{module.kernel_size[1]}", (module.in_channels,
                                                                                 module.out_channels)
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            return Decision(name, layer, False, "grouped / non-zero-padded conv: no int8 kernel")
    else:
        return None
    if _inside(name, embeddings):
        return Decision(name, layer, False, "timestep/condition embedding: a few rows per call")
    if name in FIRST_LAST:
        return Decision(name, layer, False, "first/last layer: quality-sensitive, little time")
    least = min_channels if isinstance(module, nn.Conv2d) else min_features
    if min(widths) < least:
        return Decision(name, layer, False, f"narrower than {least}")
    return Decision(name, layer, True, "quantized")


def plan(model: nn.Module, min_features: int, min_channels: int, convs: bool = True) -> list[Decision]:
    """Decisions for every linear and conv layer of ``model``, in module order."""
    embeddings = embedding_modules(model)
    out = []
    for name, module in model.named_modules():
        decision = decide(name, module, embeddings, min_features, min_channels)
        if decision is None:
            continue
        if decision.quantize and not convs and decision.layer.startswith("conv"):
            decision = Decision(name, decision.layer, False, "convs=false")
        out.append(decision)
    return out


def summarize(decisions: list[Decision]) -> str:
    """'12 of 30 layers quantized; kept: 10 narrower than 64, ...' for describe()."""
    done = sum(d.quantize for d in decisions)
    kept: dict[str, int] = {}
    for d in decisions:
        if not d.quantize:
            kept[d.reason] = kept.get(d.reason, 0) + 1
    reasons = "; ".join(f"{n} {r}" for r, n in kept.items())
    return f"{done} of {len(decisions)} layers quantized" + (f" (kept: {reasons})" if reasons else "")
