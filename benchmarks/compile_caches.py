"""Caches on a compiled denoiser: does each cache keep its speed-up over the *compiled* baseline?

The issue's target (on the SD 1.5 twin, GPU): speed-up over the compiled baseline >= 0.85 x the method's
eager speed-up, with no recompile storm. Here, on this CPU, the bundled tiny-sd (or tiny-dit) at the bench's
batch (4 prompts, CFG, DDIM 50, guidance 4): the user compiles the denoiser in place (``unet.compile()``,
Inductor), then effdiff applies the cache, which recompiles it by regions beneath its patches. Eager and
compiled are two phases (each warmed up, compilation timed apart); within a phase the baseline and every
cache alternate each round, and each ratio is the median of per-round paired ratios.

    PYTHONPATH=src HF_HUB_OFFLINE=1 python benchmarks/compile_caches.py [model] [rounds]
"""

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

import effdiff
from effdiff.adapters import denoiser_attr
from effdiff.host import cpu_description

MODEL = sys.argv[1] if len(sys.argv) > 1 else "tiny-sd"
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
# fbcache:threshold=0 skips nothing: on the compiled model it measures what compiling by regions costs alone
RECIPES = ["fbcache:threshold=0", "deepcache:interval=3", "fbcache:threshold=0.1", "taylorseer", "fora:interval=3"]
if MODEL != "tiny-sd":
    RECIPES = ["fbcache:threshold=0", "fbcache:threshold=0.1", "taylorseer", "fora:interval=3", "deltadit:interval=2"]
PROMPTS = [f"a handwritten {word}" for word in ("zero", "one", "two", "three")]
OUT = Path(__file__).parent / "results" / "compile"

torch.set_num_threads(2)
pipe = effdiff.load(MODEL)
pipe.set_progress_bar_config(disable=True)
denoiser = getattr(pipe, denoiser_attr(pipe))


def run() -> float:
    start = time.perf_counter()
    with torch.no_grad():
        pipe(PROMPTS, num_inference_steps=50, guidance_scale=4.0, generator=torch.Generator().manual_seed(0),
             output_type="pt")
    return time.perf_counter() - start


def phase(label: str) -> dict:
    first: dict[str, float] = {}
    for recipe in ["baseline", *RECIPES]:  # warm-up: the first call of each variant compiles
        if recipe != "baseline":
            effdiff.accelerate(pipe, recipe)
        first[recipe] = run()
        if recipe != "baseline":
            pipe.effdiff.remove()
    ratios: dict[str, list[float]] = {r: [] for r in RECIPES}
    times: dict[str, list[float]] = {r: [] for r in ["baseline", *RECIPES]}
    for _ in range(ROUNDS):
        base = run()
        times["baseline"].append(base)
        for recipe in RECIPES:
            effdiff.accelerate(pipe, recipe)
            seconds = run()
            pipe.effdiff.remove()
            times[recipe].append(seconds)
            ratios[recipe].append(base / seconds)
    print(f"{label}: baseline {statistics.median(times['baseline']):.3f}s (first call {first['baseline']:.1f}s)")
    for recipe in RECIPES:
        print(f"  {recipe:24s} {statistics.median(ratios[recipe]):.2f}x  (first call {first[recipe]:.1f}s)")
    return {"first_call_s": first, "times_s": times, "speedup": {r: statistics.median(v) for r, v in ratios.items()}}


eager = phase("eager")
denoiser.compile()
counters.clear()
compiled = phase("compiled (unet.compile(), Inductor; caches recompile it by regions)")
flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
result = {
    "model": MODEL, "rounds": ROUNDS, "torch": torch.__version__, "machine": cpu_description(),
    "cpu_flags": next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("Flags")), ""),
    "eager": eager, "compiled": compiled,
    "compiled_baseline_vs_eager": statistics.median(eager["times_s"]["baseline"])
    / statistics.median(compiled["times_s"]["baseline"]),
    "retained": {r: compiled["speedup"][r] / eager["speedup"][r] for r in RECIPES},
    "unique_graphs_compiled_phase": counters["stats"]["unique_graphs"],
}
print("compiled baseline vs eager baseline:", f"{result['compiled_baseline_vs_eager']:.2f}x")
print("retained (compiled speed-up / eager speed-up):",
      ", ".join(f"{r} {v:.2f}" for r, v in result["retained"].items()))
OUT.mkdir(parents=True, exist_ok=True)
(OUT / f"{MODEL}.json").write_text(json.dumps(result, indent=1))
