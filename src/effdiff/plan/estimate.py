"""Each parallel method's latency on N devices, from one traced denoiser call and the calibrated device:

- one device: every step the whole call;
- ``cfgparallel`` (2 ranks): each rank the call at batch 1, then the output gathered (synchronous);
- ``distrifusion`` (N ranks): each rank 1/N of every kernel's work (patches split every layer's work; attention's
  queries are split and its keys are whole, so its FLOPs divide too) but every kernel's floor stays; per step one
  all-gather per exchanged layer (keys and values, conv halo rows, GroupNorm statistics) — synchronous and added
  for the first ``warmup`` + 1 steps, then overlapped with the computation (step = the longer of the two) — and
  the output gathered synchronously;
- the naive patch split: DistriFusion without its exchanges (its quality is not the same image);
- ``pipefusion`` (DiTs, N stages, M patches): each stage runs 1/N of the kernels once per patch on 1/M of the
  tokens (so M times the floors), the patches fill and drain the pipeline — a step takes M + N − 1 patch-times of a
  stage; a patch's activations go to the next stage while it computes the next patch; the first step is one patch
  (N stages in turn, no speed-up); the output is broadcast. No keys or values cross the link;
- ``seqparallel`` (DiTs and MMDiTs, N ranks; exact): each rank 1/N of every kernel's work as DistriFusion (an
  MMDiT's text tokens split too). Ulysses: per self- or joint attention two all-to-alls (q, k, v of the rank's
  tokens out, the attention output back: 4 × a rank's share of one of them, of which (N − 1)/N leaves the rank),
  synchronous — nothing else can run while a layer waits for its heads. Ring: per attention N chunk attentions
  (each with its kernel floor), the keys and values going round the ring (N − 1 hops of the rank's share), each
  hop overlapping the chunk in hand, and N − 1 merges of partial results. USP's hybrids (U × R = N): Ulysses in
  groups of U, rings of R across them. All end with the output gathered.

A ring all-gather of ``m`` bytes a rank costs ``(N − 1) × (m / bandwidth + latency)``. What the model leaves out:
the kernels' slowdown while NCCL shares the SMs and memory, halo rows' extra convolution work, the text encoder
and VAE (outside the step loop), and uneven patches.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

from effdiff.plan.denoisers import DENOISERS, build_on_meta
from effdiff.plan.hardware import (
    CALIBRATION,
    DEVICES,
    LINKS,
    Constants,
    Device,
    Link,
    calibrate,
    call_seconds,
    kernel_seconds,
)
from effdiff.plan.trace import Kernel, Trace, trace_call

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Estimate:
    method: str
    devices: int
    compute_ms: float  # one rank's denoiser call
    sent_mb: float  # what one rank receives per step in the exchanges
    exchange_ms: float
    step_ms: float  # a step after the warm-up
    seconds: float  # the whole step loop
    speedup: float
    note: str = ""


@functools.cache
def traced(model: str, px: int, batch: int, dtype: str = "float16") -> Trace:
    """One call's trace, kept: tracing builds the model on the meta device (seconds each), and the calibration, every
    estimate and the paper checks ask for the same few calls again. Readers must not change the trace."""
    return trace_call(*build_on_meta(model, px, batch, DTYPES[dtype]))


def fitted_constants() -> tuple[Constants, list[float]]:
    """The per-kernel constants fitted to ``CALIBRATION``, and each measurement's relative error under them."""
    return calibrate([(m, traced(m.model, m.px, m.batch, m.dtype).kernels) for m in CALIBRATION])


def all_gather_seconds(part_bytes: Iterable[int], ranks: int, link: Link) -> float:
    return sum((ranks - 1) * (b / (link.gbps * 1e9) + link.latency_us * 1e-6) for b in part_bytes)


def distrifusion_parts(trace: Trace, ranks: int) -> list[int]:
    """Bytes a rank contributes to each exchange of one step."""
    return ([b // ranks for b in trace.kv_bytes] + list(trace.halo_bytes_per_edge) + list(trace.norm_bytes))


def estimates(model: str, px: int, ranks: int, device: Device, link: Link, constants: Constants, steps: int = 50,
              warmup: int = 4, dtype: str = "float16", patches: int | None = None) -> list[Estimate]:
    """One row per method that applies to the model (patch methods only where its adapter has a patch split);
    ``patches``: PipeFusion's patch count (default: the device count)."""
    patches = patches or ranks
    guided = DENOISERS[model][1]
    whole = traced(model, px, 2 if guided else 1, dtype)
    single = call_seconds(whole.kernels, device, constants)
    baseline = steps * single
    rows = [Estimate("one device", 1, single * 1e3, 0.0, 0.0, single * 1e3, baseline, 1.0)]

    def row(method: str, used: int, compute: float, parts: list[int], output: int, note: str = "") -> Estimate:
        exchange = all_gather_seconds(parts, used, link)
        gather = all_gather_seconds([output // used], used, link)
        synchronous, overlapped = compute + exchange + gather, max(compute, exchange) + gather
        warm = min(steps, warmup + 1) if parts else 0
        seconds = warm * synchronous + (steps - warm) * overlapped
        received = sum(parts) * (used - 1) / 1e6
        return Estimate(method, used, compute * 1e3, received, exchange * 1e3, overlapped * 1e3, seconds,
                        baseline / seconds, note)

    if guided and ranks >= 2:
        half = traced(model, px, 1, dtype)
        rows.append(row("cfgparallel", 2, call_seconds(half.kernels, device, constants), [], whole.output_bytes,
                        "exact; uses 2 of the devices" if ranks > 2 else "exact"))
    if ranks >= 2 and whole.split is not None:
        compute = call_seconds(whole.kernels, device, constants, share=ranks)
        rows.append(row("distrifusion", ranks, compute, distrifusion_parts(whole, ranks), whole.output_bytes,
                        f"warm-up {warmup} + 1 synchronous steps, then stale activations"))
        rows.append(row("naive patch (distrifusion:exchange=none)", ranks, compute, [], whole.output_bytes,
                        "no exchange: not the same image (seams)"))
        if guided and ranks >= 4 and ranks % 2 == 0:
            half = traced(model, px, 1, dtype)
            group = ranks // 2
            compute = call_seconds(half.kernels, device, constants, share=group)
            split = row("cfgparallel+distrifusion (paper)", group, compute, distrifusion_parts(half, group),
                        half.output_bytes, "CFG halves on 2 groups, patches inside each (the paper's setup)")
            rows.append(Estimate(**{**asdict(split), "devices": ranks}))
    if ranks >= 2 and whole.split == "tokens":
        rows.append(pipefusion(whole, ranks, patches, device, link, constants, steps, baseline))
    if ranks >= 2 and whole.sequence_attentions:
        rows.extend(sequence_parallel(whole, ranks, device, link, constants, steps, baseline))
    return rows


RING_MERGE_KERNELS = 8  # a chunk's partial result merged: log-add-exp, two differences, two exps, two products, a sum


def sequence_parallel(whole: Trace, ranks: int, device: Device, link: Link, constants: Constants, steps: int,
                      baseline: float) -> list[Estimate]:
    """One row per way of factoring the ranks into ``U`` (Ulysses) × ``R`` (ring) — Ulysses alone, ring alone and
    USP's hybrids between — each as ``seqparallel:ring=R`` would run (no warm-up: all are exact from the first
    step).

    Ulysses inside each group of ``U`` ranks: per attention two all-to-alls among them (q, k, v of the rank's tokens
    out, the output back: 4 × a rank's share of one of them, of which (U − 1)/U leaves the rank), synchronous —
    nothing else can run while a layer waits for its heads. Each group then holds 1/R of the tokens in 1/U of the
    heads, and the ring across the ``R`` groups makes its attention whole: ``R`` chunk attentions (each 1/(N·R) of the
    attention's work, each paying the kernel floor), the hop of the next chunk's keys and values (the rank's share
    again: 1/R of the tokens × 1/U of the heads) overlapping the chunk in hand — a hop takes the longer of the two —
    and ``R − 1`` merges of partial results. So at small sizes, where the floors dominate, a ring loses to the
    all-to-alls, as xDiT measured (``benchmarks/plan_check_sequence.py``). All end with the output gathered."""
    compute = call_seconds(whole.kernels, device, constants, share=ranks)
    gather = all_gather_seconds([whole.output_bytes // ranks], ranks, link)
    layers = whole.sequence_attentions
    share = sum(whole.sequence_bytes) / 2 / ranks  # one of q / k / v / output, every layer, one rank's tokens
    bandwidth, latency = link.gbps * 1e9, link.latency_us * 1e-6
    hop = 2 * share / max(layers, 1) / bandwidth + latency  # one layer's keys and values of one rank
    others = call_seconds([k for k in whole.kernels if not k.sequence], device, constants, share=ranks)
    # each attention with the merge of one chunk's float32 partial results (the rank's queries: the same at every R)
    attentions = [(k, RING_MERGE_KERNELS * kernel_seconds(Kernel(0, 3 * 2 * k.bytes // 4 // ranks), device, constants))
                  for k in whole.kernels if k.sequence]
    out = []
    for ring in (r for r in range(1, ranks + 1) if ranks % r == 0):
        ulysses = ranks // ring
        ulysses_bytes = 4 * share * (ulysses - 1) / ulysses
        ulysses_seconds = ulysses_bytes / bandwidth + 2 * layers * (ulysses - 1) * latency
        attention = 0.0
        for kernel, merge in attentions:
            chunk = kernel_seconds(kernel, device, constants, share=ranks * ring)
            attention += chunk + (ring - 1) * (max(chunk, hop) + merge)
        ring_bytes = 2 * share * (ring - 1)
        exchange = ulysses_seconds + ring_bytes / bandwidth + layers * (ring - 1) * latency
        step = others + attention + ulysses_seconds + gather
        if ring == 1:
            method, note = "seqparallel (Ulysses)", "exact; synchronous all-to-alls"
        elif ulysses == 1:
            method = f"seqparallel:ring={ring} (ring)"
            note = "exact; N chunk attentions a layer, each hop behind its chunk, N − 1 merges"
        else:
            method = f"seqparallel:ring={ring} (Ulysses {ulysses} × ring {ring})"
            note = "exact; all-to-alls inside groups, rings across them"
        out.append(Estimate(method, ranks, compute * 1e3, (ulysses_bytes + ring_bytes) / 1e6, exchange * 1e3,
                            step * 1e3, steps * step, baseline / (steps * step), note))
    return out


def pipefusion(whole: Trace, ranks: int, patches: int, device: Device, link: Link, constants: Constants,
               steps: int, baseline: float) -> Estimate:
    """PipeFusion's step loop: the first step as one patch through the stages in turn, then ``patches`` patches
    streamed (``M + N − 1`` patch-times of a stage, a patch-time the longer of its computation and sending it on)."""
    hidden = whole.kv_bytes[0] if whole.kv_bytes else whole.output_bytes  # a block's activations (keys' width)
    send = all_gather_seconds([hidden // patches], 2, link)
    stage = max(call_seconds(whole.kernels, device, constants, share=patches) / ranks, send)
    broadcast = all_gather_seconds([whole.output_bytes // ranks], ranks, link)
    first = call_seconds(whole.kernels, device, constants) + (ranks - 1) * all_gather_seconds([hidden], 2, link)
    streamed = (patches + ranks - 1) * stage + broadcast
    seconds = min(steps, 1) * (first + broadcast) + max(steps - 1, 0) * streamed
    return Estimate("pipefusion", ranks, stage * patches * 1e3, hidden / 1e6, send * patches * 1e3, streamed * 1e3,
                    seconds, baseline / seconds, f"{patches} patches; first step one patch")


def resolve(device: str, link: str) -> tuple[Device, Link]:
    if device not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}; got {device!r}")
    chosen = DEVICES[device]
    name = chosen.nvlink if link == "nvlink" else link
    if name not in LINKS:
        raise ValueError(f"--link must be nvlink or one of {', '.join(LINKS)}; got {link!r}")
    return chosen, LINKS[name]


def table(rows: list[Estimate]) -> str:
    """The estimates as a Markdown table."""
    lines = ["| method | devices | compute ms/step/rank | received MB/step/rank | exchange ms/step | step ms | "
             "seconds | speed-up | note |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.method} | {r.devices} | {r.compute_ms:.1f} | {r.sent_mb:.1f} | {r.exchange_ms:.1f} | "
              f"{r.step_ms:.1f} | {r.seconds:.2f} | {r.speedup:.2f}× | {r.note} |" for r in rows]
    return "\n".join(lines)
