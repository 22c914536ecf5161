"""Real low-precision kernels: what the device runs natively, the weight quantizer, and int8 layers.

Linears: fbgemm's dynamic-quantized linear (``quantized::linear_dynamic``). On an AVX2-only x86 CPU
``torch._int_mm`` and ``torch._weight_int8pack_mm`` (what torchao's int8 tensors call in eager mode) fall back
to reference loops (3-6 GFLOP/s, far below fp32), while fbgemm uses ``vpmaddubsw`` and reaches 1.5-2x fp32 on
wide layers; on an AVX512-VNNI CPU fbgemm reaches 1.2-3.8x fp32 (and ``_int_mm`` is fast too). It quantizes
activations per tensor, asymmetric; without VNNI with one bit less (``reduce_range``: u8 x s8 pairs summed in
16 bits must not saturate). Convs: oneDNN's direct int8 conv with float output (``Int8DynamicConv2d``).
Weights are int8 per output channel.

Weight-only layers keep int8 / packed int4 codes and dequantize per call into a float matmul: the point is
memory and size on disk, not speed (the dequantization costs time; the compute stays float).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from effdiff.host import cpu_flags
from effdiff.methods.quant.packing import pack, unpack
from effdiff.registry import RecipeError

ENGINE = "fbgemm"


# ---------------------------------------------------------------- what the device runs natively


def native_float(device: torch.device, dtype: torch.dtype) -> bool:
    """True where ``dtype`` matmuls/convs run on hardware support rather than an emulation slower than fp32."""
    if device.type == "cuda":
        return dtype == torch.float16 or torch.cuda.is_bf16_supported()
    if device.type == "mps":
        return True
    if dtype == torch.bfloat16:  # AVX512-BF16 / AMX; AVX2-only CPUs convert element by element (~50x slower)
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:  # AVX512-FP16 / AMX-FP16
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return dtype == torch.float32


def int8_engine_available() -> bool:
    return ENGINE in torch.backends.quantized.supported_engines


def require_int8_engine(method: str, device: torch.device) -> None:
    """Refuse int8 dynamic kernels where fbgemm cannot run them (not x86, or not on the CPU)."""
    if device.type != "cpu":
        raise RecipeError(f"{method}: the int8 dynamic kernels are fbgemm CPU kernels; the denoiser is on "
                          f"{device.type} (use bf16 or fp16 there)")
    if not int8_engine_available():
        engines = ", ".join(torch.backends.quantized.supported_engines)
        raise RecipeError(f"{method}: this torch build has no fbgemm int8 engine (x86 only); available: {engines}")


@contextmanager
def _engine(name: str):
    """Prepacking follows the global engine; set it only while packing (the packed object keeps its kernel)."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        with warnings.catch_warnings():  # quantized tensor creation is deprecated, and the only way to prepack
            warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
            warnings.filterwarnings("ignore", message=".*torch.quantize_per_tensor.*")
            yield
    finally:
        torch.backends.quantized.engine = previous


# ---------------------------------------------------------------- the weight quantizer


@dataclass
class QuantizedWeight:
    """Symmetric integer codes and one scale per output channel (or per group of ``group`` inputs)."""

    codes: torch.Tensor  # int8, the weight's shape
    scale: torch.Tensor  # float32, (out, 1, ...) or (out, in // group) for groups
    bits: int
    group: int | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.group).to(dtype)


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def quantize_weight(weight: torch.Tensor, bits: int = 8, group: int | None = None) -> QuantizedWeight:
    """Round-to-nearest symmetric quantization, scale = absmax / qmax per output channel (or group).

    Error bound: each element's |w - dequantize(codes)| <= scale / 2 of its channel/group.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    w = weight.detach().float()
    if group is None:
        absmax = w.abs().amax(dim=tuple(range(1, w.ndim)), keepdim=True)
    else:
        if w.ndim != 2 or w.shape[1] % group:
            raise ValueError(f"group {group} needs a 2-D weight whose input width divides by it, got {tuple(w.shape)}")
        absmax = w.reshape(w.shape[0], -1, group).abs().amax(dim=2)
    scale = (absmax / qmax(bits)).clamp_min(torch.finfo(torch.float32).tiny)
    codes = (w / _expand(scale, w, group)).round().clamp(-qmax(bits), qmax(bits)).to(torch.int8)
    return QuantizedWeight(codes, scale, bits, group)


def _expand(scale: torch.Tensor, like: torch.Tensor, group: int | None) -> torch.Tensor:
    return scale if group is None else scale.repeat_interleave(group, dim=1).reshape(like.shape)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, group: int | None = None) -> torch.Tensor:
    return codes.float() * _expand(scale, codes, group)


# ---------------------------------------------------------------- int8 dynamic-activation layers (W8A8)


def _qint8(q: QuantizedWeight) -> torch.Tensor:
    scales = q.scale.flatten().double()
    zeros = torch.zeros_like(scales, dtype=torch.long)
    return torch._make_per_channel_quantized_tensor(q.codes, scales, zeros, 0)


class Int8DynamicLinear(nn.Module):
    """``nn.Linear`` as int8 weights x per-call int8 activations (fbgemm). State: codes, scale, bias."""

    kind = "w8a8"

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale.reshape(-1, 1))
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self._reduce_range = not has_vnni()  # a CPU fact, read once rather than on every call
        with _engine(ENGINE):
            self._packed = torch.ops.quantized.linear_prepack(_qint8(QuantizedWeight(codes, self.scale, 8)), self.bias)

    @classmethod
    def from_float(cls, layer: nn.Linear) -> Int8DynamicLinear:
        q = quantize_weight(layer.weight, 8)
        return cls(q.codes, q.scale, layer.bias)

    def init_args(self) -> dict[str, Any]:
        return {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float().contiguous()
        out = torch.ops.quantized.linear_dynamic(flat, self._packed, self._reduce_range)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 x int8 (fbgemm dynamic)"


def quantize_uint8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-tensor asymmetric uint8 codes of ``x``, its scale and zero point (0-d tensors; the range holds 0).

    Plain tensor ops rather than ``quantize_per_tensor_dynamic`` (deprecated quantized tensors), and no
    ``.item()``: the scale stays a tensor, so nothing synchronises. As fast: one pass for the range, one fused-ish
    pass for the codes (about 6 % of a 320-channel 32x32 int8 conv).
    """
    low, high = torch.aminmax(x)
    low, high = low.clamp(max=0), high.clamp(min=0)
    scale = ((high - low) / 255).clamp_min(torch.finfo(torch.float32).tiny)
    zero = (-low / scale).round()
    codes = torch.div(x, scale).add_(zero).round_().clamp_(0, 255).to(torch.uint8)
    return codes, scale, zero.long()


class Int8DynamicConv2d(nn.Module):
    """``nn.Conv2d`` (groups 1, zero padding) as uint8 activations x int8 weights in oneDNN's direct int8 conv.

    The activation is quantized per call, per tensor and asymmetric (``quantize_uint8``); the
    kernel accumulates in int32 and writes float32 directly, so there is no output requantization and no
    calibration. Not fbgemm's ``quantized::conv2d_dynamic``: on every engine here (fbgemm, x86, onednn) it is
    wrong whenever the zero point is far from the middle of the range (65-72 % relative error after a SiLU,
    measured), which the regression test guards. On a CPU with VNNI this runs 1.6-3.9x the fp32 conv rate
    (``benchmarks/quant_peers.py --sections kernels``); without VNNI ``int8`` leaves convs in float by default.
    """

    kind = "w8a8"

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 stride: tuple[int, ...], padding: tuple[int, ...], dilation: tuple[int, ...]) -> None:
        super().__init__()
        self.out_channels, self.in_channels = codes.shape[:2]
        self.kernel_size = tuple(codes.shape[2:])
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale.reshape(-1, 1, 1, 1))
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self._zeros = torch.zeros(self.out_channels, dtype=torch.long)
        self._packed: torch.Tensor | None = None

    @classmethod
    def from_float(cls, layer: nn.Conv2d) -> Int8DynamicConv2d:
        q = quantize_weight(layer.weight, 8)
        return cls(q.codes, q.scale, layer.bias, layer.stride, layer.padding, layer.dilation)

    def init_args(self) -> dict[str, Any]:
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}

    def packed(self) -> torch.Tensor:
        """oneDNN's blocked weight, made on first use: an opaque tensor that cannot be copied or pickled."""
        if self._packed is None:
            self._packed = torch.ops.onednn.qconv_prepack(self.codes, self.scale.flatten().float(), 1.0, 0,
                                                          list(self.stride), list(self.padding),
                                                          list(self.dilation), 1, None)
        return self._packed

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_packed": None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, scale, zero = quantize_uint8(x.float())
        dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32  # bf16 written directly
        out = torch.ops.onednn.qconv2d_pointwise.tensor(
            codes, scale, zero, self.packed(), self.scale.flatten().float(), self._zeros, self.bias,
            list(self.stride), list(self.padding), list(self.dilation), 1, 1.0, 0, dtype, "none", [], "")
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, int8 x int8 (oneDNN, dynamic activations)")


# ---------------------------------------------------------------- weight-only layers (memory, not speed)


class _WeightOnly(nn.Module):
    """Integer weight codes, dequantized per call. 8 bits: one scale per output channel; 4 bits: one per
    ``group`` consecutive inputs (the fan-in, zero-padded to a multiple of ``group``), two codes per byte."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, bits: int,
                 group: int | None, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.bits, self.group, self.shape = bits, group, tuple(shape)
        self.kind = f"w{bits}a32"
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    @staticmethod
    def encode(weight: torch.Tensor, bits: int, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        flat = weight.detach().reshape(weight.shape[0], -1)
        if group is not None:
            flat = F.pad(flat, (0, -flat.shape[1] % group))
        q = quantize_weight(flat, bits, group)
        return (pack(q.codes, 4, -8) if bits == 4 else q.codes), q.scale

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        fan_in = torch.Size(self.shape[1:]).numel()
        codes = self.codes
        if self.bits == 4:
            padded = -(-fan_in // self.group) * self.group if self.group else fan_in
            codes = unpack(codes, 4, -8, self.shape[0] * padded).reshape(self.shape[0], padded)
        return dequantize(codes, self.scale, self.group)[:, :fan_in].reshape(self.shape).to(dtype)

    def init_args(self) -> dict[str, Any]:
        return {"bits": self.bits, "group": self.group, "shape": self.shape}

    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(dtype)


class WeightOnlyLinear(_WeightOnly):
    """``nn.Linear`` with int8 (per channel) or packed int4 (per group) weights."""

    @classmethod
    def from_float(cls, layer: nn.Linear, bits: int, group: int | None = None) -> WeightOnlyLinear:
        return cls(*cls.encode(layer.weight, bits, group), layer.bias, bits, group, tuple(layer.weight.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(x.dtype), self._bias(x.dtype))

    def extra_repr(self) -> str:
        grouping = f", group={self.group}" if self.group else ""
        return f"in_features={self.shape[1]}, out_features={self.shape[0]}, int{self.bits} weights{grouping}"


class WeightOnlyConv2d(_WeightOnly):
    """``nn.Conv2d`` with int8 (per channel) or packed int4 (per group of the fan-in) weights."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, bits: int,
                 group: int | None, shape: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...],
                 dilation: tuple[int, ...]) -> None:
        super().__init__(codes, scale, bias, bits, group, shape)
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)

    @classmethod
    def from_float(cls, layer: nn.Conv2d, bits: int = 8, group: int | None = None) -> WeightOnlyConv2d:
        return cls(*cls.encode(layer.weight, bits, group), layer.bias, bits, group, tuple(layer.weight.shape),
                   layer.stride, layer.padding, layer.dilation)

    def init_args(self) -> dict[str, Any]:
        return {**super().init_args(), "stride": self.stride, "padding": self.padding, "dilation": self.dilation}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight(x.dtype), self._bias(x.dtype), self.stride, self.padding, self.dilation)


LAYER_CLASSES: dict[str, type[nn.Module]] = {
    cls.__name__: cls for cls in (Int8DynamicLinear, Int8DynamicConv2d, WeightOnlyLinear, WeightOnlyConv2d)
}


VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def has_vnni() -> bool:
    """True where the CPU multiplies u8 x s8 into 32-bit sums (VNNI / AMX): int8 needs no ``reduce_range``
    (AVX2's ``vpmaddubsw`` sums pairs in 16 bits and saturates unless activations lose a bit), and the direct
    int8 conv outruns fp32 (1.6-3.9x measured from 64 channels), so ``int8`` quantizes convs by default."""
    return bool(cpu_flags() & VNNI_FLAGS)


