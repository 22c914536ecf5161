"""Real low-precision kernels side by side with the peers (torchao, optimum-quanto): one process per model.

Sections (``--sections``):
  kernels  raw kernel rates on this CPU (GFLOP/s): fp32 / bf16 matmul and conv, ``torch._int_mm`` (what
           torchao's int8 calls in eager), ``torch._weight_int8pack_mm``, fbgemm's dynamic int8 linear and conv
           (what effdiff ``int8`` calls) across layer widths — the evidence behind ``select``'s rule;
  profile  torch.profiler on one SD 1.5 down block (2 resnets, 2 transformers, 320 ch, 32x32, batch 2) for
           fp32 and every int8 variant: where the time goes (top ops by self CPU time);
  compile  the same block eager and under ``torch.compile`` for fp32, bf16 and every int8 variant;
  models   each ``--models`` pipeline: fp32 baseline, plain bf16 cast (peer-style ``pipe.to``), effdiff bf16,
           torchao int8 dynamic / weight-only, optimum-quanto qint8 weights, effdiff int8 / int8wo / int4wo.
           Every variant first times one denoiser forward on the pipeline's own inputs; a variant slower than
           ``--max-slowdown`` x fp32 there is reported from that forward alone (a full call would take
           minutes). The others run full calls in a round robin (all variants, then again; warm-up call first,
           median of ``--reps``). PSNR vs the fp32 images for the bundled models (twins are speed-only).
           Size on disk: the denoiser's serialized state dict (effdiff: ``save()``; peers: ``torch.save``).

    PYTHONPATH=src HF_HUB_OFFLINE=1 flock /tmp/effdiff-heavy.lock python benchmarks/quant_peers.py \
        --models tiny-sd,tiny-dit [--steps 20] [--reps 3] [--sections kernels,profile,models]
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import effdiff
from effdiff.adapters import denoiser_attr
from effdiff.eval.cost import PeakMemory
from effdiff.eval.fidelity import fidelity
from effdiff.host import cpu_description, simd
from effdiff.methods.quant.native.kernels import Int8DynamicConv2d, Int8DynamicLinear, has_vnni, native_float
from effdiff.registry import RecipeError

warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
PROMPTS = {"tiny-sd": ["a handwritten seven", "a handwritten three"], "tiny-dit": ["a handwritten seven",
                                                                                   "a handwritten three"]}
TWIN_PROMPT = ["a photo of a cat"]
GUIDANCE = 4.0


# ---------------------------------------------------------------- kernels


def rate(fn: Callable[[], Any], flops: float, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return flops / statistics.median(times) / 1e9


def linear_row(m: int, k: int, n: int) -> dict[str, Any]:
    x, w = torch.randn(m, k), torch.randn(n, k)
    flops = 2 * m * k * n
    q = Int8DynamicLinear.from_float(torch.nn.Linear(k, n))
    row: dict[str, Any] = {"op": "linear", "shape": f"{m}x{k}x{n}", "fp32": rate(lambda: F.linear(x, w), flops),
                           "fbgemm_int8_dynamic": rate(lambda: q(x), flops)}
    if has_vnni() or m * k * n <= 2048 * 320 * 320:  # without VNNI, reference loops: seconds on the big shapes
        xi, wi = torch.randint(-127, 127, (m, k), dtype=torch.int8), torch.randint(-127, 127, (k, n), dtype=torch.int8)
        wt, ones = wi.t().contiguous(), torch.ones(n)
        row["torch._int_mm"] = rate(lambda: torch._int_mm(xi, wi), flops, reps=3)
        row["torch._weight_int8pack_mm"] = rate(lambda: torch._weight_int8pack_mm(x, wt, ones), flops, reps=3)
        xb, wb = x.bfloat16(), w.bfloat16()
        row["bf16"] = rate(lambda: F.linear(xb, wb), flops, reps=3)
    return row


@torch.no_grad()
def conv_row(c: int, hw: int, kernel: int) -> dict[str, Any]:
    conv = torch.nn.Conv2d(c, c, kernel, padding=kernel // 2)
    image = torch.randn(2, c, hw, hw)
    flops = 2 * 2 * c * c * hw * hw * kernel * kernel
    q = Int8DynamicConv2d.from_float(conv)
    row: dict[str, Any] = {"op": f"conv{kernel}x{kernel}", "shape": f"2x{c}x{hw}x{hw}",
                           "fp32": rate(lambda: conv(image), flops),
                           "onednn_int8_dynamic": rate(lambda: q(image), flops)}
    if c <= 128 or native_float(torch.device("cpu"), torch.bfloat16):  # emulated bf16 takes seconds on wide convs
        cb, ib = copy.deepcopy(conv).bfloat16(), image.bfloat16()
        row["bf16"] = rate(lambda: cb(ib), flops, reps=2)
    return row


def kernels_section() -> list[dict[str, Any]]:
    print("\n== kernels (GFLOP/s, median of 5; linear shape = rows x in x out)", flush=True)
    rows = [linear_row(*shape) for shape in [(2048, 32, 32), (2048, 64, 64), (2048, 128, 128), (2048, 320, 320),
                                             (2048, 320, 1280), (512, 640, 640), (128, 1280, 1280), (154, 768, 320)]]
    rows += [conv_row(*shape) for shape in [(32, 32, 3), (64, 32, 3), (128, 16, 3), (320, 32, 3), (640, 16, 3),
                                            (1280, 8, 3), (320, 32, 1)]]
    for row in rows:
        print("  " + "  ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)
    return rows


# ---------------------------------------------------------------- peers


def torchao_quantize(kind: str) -> Callable[[torch.nn.Module], None]:
    def run(model: torch.nn.Module) -> None:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8DynamicActivationInt8WeightConfig() if kind == "dynamic" else Int8WeightOnlyConfig())

    return run


def quanto_quantize(model: torch.nn.Module) -> None:
    from optimum.quanto import freeze, qint8, quantize

    quantize(model, weights=qint8)
    freeze(model)


def serialized_bytes(state: dict[str, Any]) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.tell()


# ---------------------------------------------------------------- profile


def sd15_block() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """SD 1.5's first down block (2 resnets + 2 transformers, 320 ch) and batch-2 inputs at 256 px."""
    pipe = effdiff.load("sd15-arch")
    block = pipe.unet.down_blocks[0]
    torch.manual_seed(0)
    text = torch.randn(2, 77, 768)
    return block, (torch.randn(2, 320, 32, 32), torch.randn(2, 1280)), {"encoder_hidden_states": text}


BLOCK_VARIANTS: dict[str, Callable[[torch.nn.Module], Any]] = {
    "fp32": lambda m: None, "effdiff int8 (linears)": lambda m: effdiff_int8_module(m, False),
    "effdiff int8 (linears + convs)": lambda m: effdiff_int8_module(m, True),
    "torchao int8 dynamic": torchao_quantize("dynamic"), "torchao int8 weight-only": torchao_quantize("weight"),
    "quanto qint8 weights": quanto_quantize}


def profile_section(top: int = 6) -> list[dict[str, Any]]:
    from torch.profiler import ProfilerActivity, profile

    print("\n== profile: SD 1.5 down_blocks[0] (2 resnets + 2 transformers, 320 ch, 32x32, batch 2)", flush=True)
    block, args, kwargs = sd15_block()
    rows = []
    for label, prepare in BLOCK_VARIANTS.items():
        model = copy.deepcopy(block)
        prepare(model)
        with torch.no_grad():
            model(*args, **kwargs)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                model(*args, **kwargs)
                seconds = time.perf_counter() - start
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events) or 1
        ops = [{"op": e.key, "share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in events[:top]]
        rows.append({"variant": label, "seconds": round(seconds, 3), "top_ops": ops})
        print(f"  {label:26s} {seconds:7.3f}s  " + ", ".join(f"{o['op']} {o['share']:.0%}" for o in ops[:4]),
              flush=True)
        del model
    return rows


def compile_section(reps: int = 5) -> list[dict[str, Any]]:
    """The same block eager and under ``torch.compile`` (inductor, CPU), for fp32, bf16 and the int8 variants:
    whether compilation changes the peers' picture (torchao's int8 is designed around it)."""
    print("\n== compile: SD 1.5 down_blocks[0], eager vs torch.compile (median of 5 after warm-up)", flush=True)
    block, args, kwargs = sd15_block()
    variants = {**BLOCK_VARIANTS, "bf16 (block cast)": lambda m: m.bfloat16()}
    rows, fp32_eager = [], None
    for label, prepare in variants.items():
        for compiled in (False, True):
            model = copy.deepcopy(block)
            prepare(model)
            inputs = tuple(a.bfloat16() for a in args) if label.startswith("bf16") else args
            extra = {k: v.bfloat16() for k, v in kwargs.items()} if label.startswith("bf16") else kwargs
            torch._dynamo.reset()
            runner = torch.compile(model) if compiled else model
            row: dict[str, Any] = {"variant": label, "compiled": compiled}
            try:
                with torch.no_grad():
                    start = time.perf_counter()
                    runner(*inputs, **extra)
                    row["first_call_s"] = round(time.perf_counter() - start, 2)
                    times = []
                    for _ in range(reps):
                        start = time.perf_counter()
                        runner(*inputs, **extra)
                        times.append(time.perf_counter() - start)
                row["seconds"] = round(statistics.median(times), 4)
                fp32_eager = fp32_eager or row["seconds"]
                row["speedup_vs_fp32_eager"] = round(fp32_eager / row["seconds"], 3)
            except Exception as exc:  # a peer's compile path failing is a result, not a crash
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            rows.append(row)
            print(f"  {label:32s} {'compiled' if compiled else 'eager':8s} " + (
                f"{row['seconds']:7.3f}s  {row['speedup_vs_fp32_eager']:.2f}x  (first call {row['first_call_s']}s)"
                if "seconds" in row else row["error"]), flush=True)
    return rows


def effdiff_int8_module(module: torch.nn.Module, convs: bool) -> None:
    """effdiff's int8 layers on a bare block (the method itself needs a pipeline): same rule, same kernels."""
    from effdiff.methods.quant.native.int8 import Int8
    from effdiff.methods.quant.native.select import plan
    from effdiff.patches import PatchLog

    swaps = PatchLog()
    for d in plan(module, Int8.params["min_features"].default, Int8.params["min_channels"].default, convs):
        if d.quantize:
            layer = module.get_submodule(d.name)
            cls = Int8DynamicLinear if isinstance(layer, torch.nn.Linear) else Int8DynamicConv2d
            swaps.module(module, d.name, cls.from_float(layer))


# ---------------------------------------------------------------- models


@dataclass
class Variant:
    label: str
    run: Callable[[], torch.Tensor]
    enter: Callable[[], Any] = lambda: None
    leave: Callable[[], Any] = lambda: None
    disk_bytes: int | None = None
    note: str = ""
    times: list[float] = field(default_factory=list)
    images: torch.Tensor | None = None
    forward_s: float | None = None
    peak_bytes: int | None = None
    rotate: bool = True
    apply_times: list[float] = field(default_factory=list)


def state_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def build_variants(pipe: Any, model: str, call: Callable[[Any], torch.Tensor], emulated: bool,
                   tmp: Path) -> tuple[list[Variant], list[dict[str, Any]]]:
    attr = denoiser_attr(pipe)
    denoiser = getattr(pipe, attr)
    variants = [Variant("fp32", lambda: call(pipe), disk_bytes=state_bytes(denoiser))]
    refused: list[dict[str, Any]] = []
    bf16_native = native_float(torch.device("cpu"), torch.bfloat16)

    def swapped(label: str, quantize: Callable[[torch.nn.Module], None]) -> None:
        copy_ = copy.deepcopy(denoiser)
        quantize(copy_)

        def enter() -> None:
            setattr(pipe, attr, copy_)

        def leave() -> None:
            setattr(pipe, attr, denoiser)

        variants.append(Variant(label, lambda: call(pipe), enter, leave, serialized_bytes(copy_.state_dict())))

    if bf16_native or (emulated and model.startswith("tiny")):
        peer = copy.deepcopy(pipe).to(torch.bfloat16)
        note = "" if bf16_native else "emulated bf16 (no native kernels here): quality only, time is not a speed"
        variants.append(Variant("bf16 plain cast (pipe.to)", lambda: call(peer).float(),
                                disk_bytes=state_bytes(getattr(peer, attr)), note=note))
    else:
        refused.append({"variant": "bf16 plain cast (pipe.to)", "refused": "no native bf16 on this CPU (emulated "
                        "bf16 runs ~50x below fp32, see the kernels section): not timed"})
    recipes = ["bf16" + (":emulated=true" if emulated and not bf16_native and model.startswith("tiny") else ""),
               "int8", "int8wo"] + (["int4wo"] if model.startswith("tiny") else [])  # twins: minutes per variant
    if model.startswith("tiny"):  # every eligible layer in W8A8, for its quality (the default rule skips narrow ones)
        recipes.append("int8:min_features=1,min_channels=1,convs=true")
    recipes.append("int8:convs=false" if has_vnni() else "int8:convs=true")  # the other side of convs=auto
    if emulated and not bf16_native and model.startswith("tiny"):
        recipes += ["bf16:emulated=true,keep=none", "bf16:emulated=true,keep=all", "fp16:emulated=true"]
    for label, quantize in [("torchao int8 dynamic", torchao_quantize("dynamic")),
                            ("torchao int8 weight-only", torchao_quantize("weight")),
                            ("quanto qint8 weights", quanto_quantize)]:
        swapped(label, quantize)
    for recipe in recipes:
        label = f"effdiff {recipe}"
        try:
            effdiff.accelerate(pipe, recipe)
        except RecipeError as exc:
            refused.append({"variant": label, "refused": str(exc)})
            print(f"  {label:44s} refused: {exc}", flush=True)
            continue
        method = pipe.effdiff.methods[-1]
        size = method.save(tmp / f"{model}-{recipe}.safetensors") if hasattr(method, "save") else (
            state_bytes(getattr(pipe, attr)))
        note = "; ".join(m.describe().split(": ", 1)[-1] for m in pipe.effdiff.methods)
        if "emulated=true" in recipe:
            note = "emulated (quality only, time is not a speed); " + note
        pipe.effdiff.remove()
        if model.startswith("tiny"):  # an accelerated copy of its own: one-time packing is not timed per call
            own = copy.deepcopy(pipe)
            effdiff.accelerate(own, recipe)
            variants.append(Variant(label, lambda p=own: call(p), disk_bytes=size, note=note))
        else:  # a twin has no memory for a copy per variant: applied before each call, the apply time recorded
            variants.append(Variant(label, lambda: call(pipe), lambda r=recipe: effdiff.accelerate(pipe, r),
                                    lambda: pipe.effdiff.remove(), size, note))
    return variants, refused


def first_denoiser_call(pipe: Any, run: Callable[[], Any]) -> tuple[tuple, dict]:
    """The positional and keyword inputs of the denoiser's first call during ``run()``."""
    captured: dict[str, Any] = {}
    handle = getattr(pipe, denoiser_attr(pipe)).register_forward_pre_hook(
        lambda module, args, kwargs: captured.setdefault("call", (args, kwargs)), with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return captured["call"]


def forward_probe(pipe: Any, variants: list[Variant], max_slowdown: float) -> None:
    """Time one denoiser forward per variant on the pipeline's real inputs; drop far-too-slow ones."""
    attr = denoiser_attr(pipe)
    args, kwargs = first_denoiser_call(pipe, variants[0].run)
    for v in variants:
        if v.note.startswith("emulated"):
            continue  # emulated precisions are measured for quality only
        v.enter()
        try:
            with torch.no_grad():
                start = time.perf_counter()
                getattr(pipe, attr)(*args, **kwargs)  # first call: lazy packing, allocator warm-up
                first = time.perf_counter() - start
                if variants[0].forward_s and first > 2 * max_slowdown * variants[0].forward_s:
                    v.forward_s = first  # far too slow either way: a second forward would only cost minutes
                else:
                    start = time.perf_counter()
                    getattr(pipe, attr)(*args, **kwargs)
                    v.forward_s = time.perf_counter() - start
        finally:
            v.leave()
        slow = v.forward_s / variants[0].forward_s if variants[0].forward_s else 1.0
        print(f"  forward {v.label:42s} {v.forward_s:7.3f}s  ({1 / slow:.2f}x)", flush=True)
        if slow > max_slowdown:
            v.rotate = False
            v.note = (v.note + "; " if v.note else "") + f"{slow:.1f}x slower per forward: full calls not run"


def measure(variants: list[Variant], reps: int) -> None:
    """Warm-up call per variant (its images), then ``reps`` round robins over all rotating variants."""
    for v in variants:
        if not v.rotate:
            continue
        v.enter()
        try:
            with PeakMemory() as peak:
                v.images = v.run()
            v.peak_bytes = peak.peak_bytes
        finally:
            v.leave()
        print(f"  warm {v.label:45s} done", flush=True)
    for r in range(reps):
        for v in variants:
            if not v.rotate or v.note.startswith("emulated"):
                continue
            start = time.perf_counter()
            v.enter()
            v.apply_times.append(time.perf_counter() - start)
            try:
                start = time.perf_counter()
                v.run()
                v.times.append(time.perf_counter() - start)
            finally:
                v.leave()
        print(f"  round {r + 1}/{reps} done", flush=True)


def model_section(model: str, steps: int, reps: int, max_slowdown: float, emulated: bool) -> list[dict[str, Any]]:
    twin = not model.startswith("tiny")
    print(f"\n== {model}: {steps} DDIM steps, guidance {GUIDANCE}, reps {reps}"
          + (" (speed-only twin, 256 px, latents out: the VAE is not timed)" if twin else ""), flush=True)
    pipe = effdiff.load(model)
    prompts = TWIN_PROMPT if twin else PROMPTS[model]
    extra = {"height": 256, "width": 256, "output_type": "latent"} if twin else {"output_type": "pt"}

    def call(p: Any) -> torch.Tensor:
        out = p(prompts, num_inference_steps=steps, guidance_scale=GUIDANCE,
                generator=torch.Generator().manual_seed(0), **extra).images
        return torch.as_tensor(out).float()

    with tempfile.TemporaryDirectory() as tmp:
        variants, refused = build_variants(pipe, model, call, emulated, Path(tmp))
        forward_probe(pipe, variants, max_slowdown)
        measure(variants, reps)
    base = variants[0]
    rows = []
    for v in variants:
        row: dict[str, Any] = {"model": model, "variant": v.label, "steps": steps, "nfe": steps,
                               "label": "speed-only" if twin else ""}
        if v.forward_s is not None and base.forward_s:
            row["forward_s"] = round(v.forward_s, 4)
            row["forward_speedup"] = round(base.forward_s / v.forward_s, 3)
        if v.times:
            row["apply_s"] = round(statistics.median(v.apply_times), 4)  # set-up before each timed call, untimed
            row["times_s"] = [round(t, 4) for t in v.times]
            row["median_s"] = round(statistics.median(v.times), 4)
            row["speedup"] = round(statistics.median(base.times) / row["median_s"], 3)
        if v.disk_bytes is not None:
            row["disk_mb"] = round(v.disk_bytes / 2**20, 2)
            row["disk_ratio"] = round(v.disk_bytes / base.disk_bytes, 3)
        if v.peak_bytes:
            row["peak_rss_mb"] = round(v.peak_bytes / 2**20)
        if not twin and v.images is not None and base.images is not None:
            row.update({k: round(val, 2 if k == "psnr" else 4) for k, val in fidelity(
                v.images.clamp(0, 1), base.images.clamp(0, 1)).items()})
        if v.note:
            row["note"] = v.note
        rows.append(row)
    for r in refused:
        rows.append({"model": model, **r})
    print_rows(rows)
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(f"  {'variant':44s} {'speedup':>8s} {'fwd x':>6s} {'s/call':>8s} {'psnr':>6s} {'disk MB':>8s} "
          f"{'disk x':>6s} {'peak MB':>8s}  note")
    for r in rows:
        if "refused" in r:
            print(f"  {r['variant']:44s} refused: {r['refused'][:110]}")
            continue

        print(f"  {r['variant']:44s} {cell(r, 'speedup', '8.2f'):>8s} {cell(r, 'forward_speedup', '6.2f'):>6s} "
              f"{cell(r, 'median_s', '8.3f'):>8s} {cell(r, 'psnr', '6.2f'):>6s} {cell(r, 'disk_mb', '8.1f'):>8s} "
              f"{cell(r, 'disk_ratio', '6.3f'):>6s} {cell(r, 'peak_rss_mb', '8d'):>8s}  {r.get('note', '')[:90]}",
              flush=True)


def cell(row: dict[str, Any], key: str, fmt: str) -> str:
    return format(row[key], fmt) if key in row else "-"


def save(path: Path, key: str, rows: Any, args: argparse.Namespace) -> None:
    existing = json.loads(path.read_text()) if path.exists() else {}
    host = {"when": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": f"{cpu_description()} threads={torch.get_num_threads()}",
            "cpu_simd": simd(),
            "torch": torch.__version__}
    existing.update({"benchmark": "quant_peers", "guidance": GUIDANCE, **host})
    existing.setdefault("runs", {})[key] = {"args": vars(args), **host, "rows": rows}  # hosts differ between runs
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(existing, indent=1))
    print(f"wrote {path} [{key}]", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="kernels,profile,models")
    parser.add_argument("--models", default="tiny-sd,tiny-dit")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-slowdown", type=float, default=3.0)
    parser.add_argument("--emulated", action="store_true", help="tiny models: also run emulated bf16/fp16 (quality)")
    parser.add_argument("--out", default="benchmarks/results/quant/quant_peers.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    sections = args.sections.split(",")
    if "kernels" in sections:
        save(out, "kernels", kernels_section(), args)
    if "profile" in sections:
        save(out, "profile", profile_section(), args)
    if "compile" in sections:
        save(out, "compile", compile_section(), args)
    if "models" in sections:
        for model in args.models.split(","):
            save(out, f"{model}-{args.steps}steps", model_section(model, args.steps, args.reps, args.max_slowdown,
                                                                 args.emulated), args)


if __name__ == "__main__":
    main()
