"""Where token reduction pays: speed-up vs token count for a U-Net (sd15-arch) and a DiT (pixart-alpha-arch).

One denoiser forward with a CFG batch of 2 (a full pipeline at 512 px takes minutes per call on 2 cores),
at 256 / 384 / 512 px (latent 32 / 48 / 64), on the **speed-only** random-weight twins. Variants: effdiff
``tome`` and ``atedm`` (``early=0`` so every forward prunes) and, on the U-Net, ``tomesd.apply_patch`` at
the same settings. Timing: all variants warmed once, then ``--reps`` rounds of baseline and every variant
in turn (round robin, so drifting load hits all alike); speed-up = baseline median / variant median.
Peak memory: process RSS high-water mark, reset before one call of each variant.

    PYTHONPATH=src HF_HUB_OFFLINE=1 python benchmarks/tokens_breakeven.py --model sd15-arch [--reps 3]
    PYTHONPATH=src HF_HUB_OFFLINE=1 python benchmarks/tokens_breakeven.py --model pixart-alpha-arch
    PYTHONPATH=src HF_HUB_OFFLINE=1 python benchmarks/tokens_breakeven.py --plot-only

Results merge into ``benchmarks/results/tokens/breakeven.json`` (rows of the same model, size and variant
are replaced); the plot ``breakeven.png`` is redrawn from every row in that file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from cache_peers import effdiff_variant

import effdiff
from effdiff.eval.cost import PeakMemory, timed
from effdiff.host import cpu_description
from effdiff.recipe import parse

OUT = Path("benchmarks/results/tokens")
PATCH = {"sd15-arch": 1, "pixart-alpha-arch": 2}  # latent pixels per token at the finest level
Switch = dict[str, tuple[Callable[[], Any], Callable[[], Any]]]


def denoiser_call(pipe: Any, model: str, latent: int) -> Callable[[], torch.Tensor]:
    """One guided (batch 2) forward of the denoiser with fixed random inputs."""
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, latent, latent, generator=gen)
    t = torch.tensor([500, 500])
    if model == "sd15-arch":
        text = torch.randn(2, 77, 768, generator=gen)
        return lambda: pipe.unet(sample, t, encoder_hidden_states=text).sample
    text = torch.randn(2, 120, 4096, generator=gen)
    cond = {"resolution": None, "aspect_ratio": None}
    return lambda: pipe.transformer(sample, encoder_hidden_states=text, timestep=t, added_cond_kwargs=cond).sample


def variants(pipe: Any, model: str, ratio: float, recipes: list[str] | None, peer: bool) -> Switch:
    """name -> (enter, leave); the baseline is the unpatched pipeline."""
    out: Switch = {}
    for recipe in recipes or (f"tome:ratio={ratio}", f"atedm:ratio={ratio},early=0"):
        out[f"effdiff {recipe}"] = effdiff_variant(pipe, recipe)
    if model == "sd15-arch" and peer:
        tome_recipes = [r for r in recipes or () if r.split(":")[0] == "tome"]
        for settings in [tomesd_settings(r) for r in tome_recipes] or [{"ratio": ratio}]:
            out["tomesd " + ",".join(f"{k}={v}" for k, v in settings.items())] = tomesd_switch(pipe, **settings)
    return out


def tomesd_switch(pipe: Any, **settings: Any) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(install, remove) of ``tomesd.apply_patch(pipe, **settings)``."""
    import tomesd

    return (lambda: tomesd.apply_patch(pipe, **settings)), (lambda: tomesd.remove_patch(pipe))


def tomesd_settings(recipe: str) -> dict[str, Any]:
    """The ``tomesd.apply_patch`` keywords equal to an effdiff ``tome`` recipe (the two share parameter names)."""
    values = parse(recipe)[0].values
    return {k: values[k] for k in ("ratio", "max_downsample", "sx", "sy", "use_rand", "merge_attn",
                                   "merge_crossattn", "merge_mlp")}


class ModuleClock:
    """Wall seconds spent inside some modules during one call (forward hooks, so any patch inside counts)."""

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        self.seconds = 0.0
        self._start: dict[int, float] = {}
        self.handles = []
        for module in modules:
            self.handles.append(module.register_forward_pre_hook(self._enter))
            self.handles.append(module.register_forward_hook(self._leave))

    def _enter(self, module: torch.nn.Module, args: tuple) -> None:
        self._start[id(module)] = time.perf_counter()

    def _leave(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self.seconds += time.perf_counter() - self._start.pop(id(module))

    def read(self) -> float:
        """Seconds since the last read."""
        value, self.seconds = self.seconds, 0.0
        return value

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def full_resolution_attention(pipe: Any) -> list[torch.nn.Module]:
    """The U-Net's transformer modules at downsample 1, where tomesd's default setting merges."""
    unet = pipe.unet
    return [*getattr(unet.down_blocks[0], "attentions", []), *getattr(unet.up_blocks[-1], "attentions", [])]


def round_robin(switch: Switch, run: Callable[[], Any], reps: int, label: str = "",
                clock: ModuleClock | None = None) -> tuple[
        dict[str, list[float]], dict[str, Any], dict[str, int], dict[str, list[float]]]:
    """Warm every variant once (keeping its output and peak memory), then ``reps`` rounds of all in turn.

    ``switch`` maps a name to (enter, leave); the first entry should be the baseline. Returns the seconds
    of every round, the outputs and the peak bytes (RSS high-water mark reset before the call) per name,
    and, with a ``clock``, the seconds of each timed round spent inside the clocked modules.
    """
    times: dict[str, list[float]] = {n: [] for n in switch}
    inside: dict[str, list[float]] = {n: [] for n in switch}
    outputs: dict[str, Any] = {}
    peaks: dict[str, int] = {}
    for name, (enter, leave) in switch.items():
        enter()
        try:
            with torch.no_grad():
                run()
                with PeakMemory() as mem:
                    outputs[name] = run()
            peaks[name] = mem.peak_bytes
        finally:
            leave()
    for rep in range(reps):
        for name, (enter, leave) in switch.items():
            enter()
            try:
                with torch.no_grad():
                    if clock is not None:
                        clock.read()
                    times[name].append(timed(run))
                    if clock is not None:
                        inside[name].append(clock.read())
            finally:
                leave()
        print(f"  {label} round {rep + 1}/{reps}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()),
              flush=True)
    return times, outputs, peaks, inside


def measure(model: str, pipe: Any, px: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    latent = px // 8
    switch: Switch = {"baseline": (lambda: None, lambda: None),
                      **variants(pipe, model, args.ratio, args.recipe, not args.no_peer)}
    names = list(switch)
    clock = ModuleClock(full_resolution_attention(pipe)) if args.clock and model == "sd15-arch" else None
    try:
        times, outputs, peaks, inside = round_robin(switch, denoiser_call(pipe, model, latent), args.reps,
                                                    f"{model} {px}px", clock)
    finally:
        if clock is not None:
            clock.close()
    base = statistics.median(times["baseline"])
    tokens = (latent // PATCH[model]) ** 2
    rows = []
    for name in names:
        med = statistics.median(times[name])
        diff = (outputs[name] - outputs["baseline"]).abs().max().item()
        rows.append({"model": model, "px": px, "tokens": tokens, "variant": name, "median_s": round(med, 4),
                     "baseline_s": round(base, 4), "run": time.strftime("%H:%M:%S"),
                     "times_s": [round(t, 4) for t in times[name]], "speedup": round(base / med, 3),
                     "peak_mb": round(peaks[name] / 2**20), "max_abs_diff_vs_baseline": round(diff, 5)})
        clocked = ""
        if inside[name]:
            rows[-1]["full_res_attention_s"] = [round(t, 4) for t in inside[name]]
            rows[-1]["full_res_attention_median_s"] = round(statistics.median(inside[name]), 4)
            clocked = f"  full-res attention {statistics.median(inside[name]):6.3f}s"
        print(f"  {model:18s} {px}px {tokens:5d} tokens  {name:36s} {base / med:5.2f}x  "
              f"{med:7.3f}s  peak {peaks[name] / 2**20:6.0f} MB{clocked}", flush=True)
    return rows


def merge_rows(path: Path, header: dict[str, Any], rows: list[dict[str, Any]], started: float) -> Path:
    """Write ``header`` and ``rows`` to ``path``, keeping earlier rows of other (model, px, variant) keys."""
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(path.read_text()) if path.exists() else {}
    fresh = {(r["model"], r["px"], r["variant"]) for r in rows}
    kept = [r for r in existing.get("rows", []) if (r["model"], r["px"], r["variant"]) not in fresh]
    result = {**header, "when": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "machine": cpu_description(),
              "seconds": round(time.time() - started, 1), "rows": kept + rows}
    path.write_text(json.dumps(result, indent=1))
    return path


def save(rows: list[dict[str, Any]], args: argparse.Namespace, started: float) -> Path:
    header = {"benchmark": "tokens_breakeven", "label": "speed-only",
              "what": "one denoiser forward, CFG batch 2, float32, cpu", "reps": args.reps, "ratio": args.ratio}
    return merge_rows(OUT / "breakeven.json", header, rows, started)


TOMESD_DEFAULTS = {"max_downsample": "1", "sx": "2", "sy": "2", "use_rand": "True", "merge_attn": "True",
                   "merge_crossattn": "False", "merge_mlp": "False"}


def short_label(variant: str) -> str:
    """A legend entry: tomesd's rows list every keyword; keep only those that differ from its defaults."""
    if not variant.startswith("tomesd "):
        return variant
    pairs = [kv.split("=", 1) for kv in variant.removeprefix("tomesd ").split(",")]
    return "tomesd " + ",".join(f"{k}={v}" for k, v in pairs if TOMESD_DEFAULTS.get(k) != v)


def plot() -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads((OUT / "breakeven.json").read_text())["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 6.5), sharey=True)
    for ax, model in zip(axes, PATCH, strict=True):
        mine = [r for r in rows if r["model"] == model and r["variant"] != "baseline"]
        if not mine:
            ax.set_visible(False)
            continue
        for label in sorted({short_label(r["variant"]) for r in mine}):  # older rows name tomesd's defaults
            points = sorted((r["tokens"], r["speedup"], r["px"]) for r in mine if short_label(r["variant"]) == label)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label,
                    ls="--" if label.startswith("tomesd") else "-")
            for tokens, speedup, px in points:
                ax.annotate(f"{px}px", (tokens, speedup), textcoords="offset points", xytext=(3, 4), fontsize=7)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{model} (speed-only), one CFG forward")
        ax.set_xlabel("tokens per finest-level transformer block")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    axes[0].set_ylabel("speed-up vs baseline (same process)")
    fig.tight_layout()
    path = OUT / "breakeven.png"
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=tuple(PATCH), action="append")
    parser.add_argument("--px", type=int, action="append", help="image sizes (default 256 384 512)")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--recipe", action="append", help="effdiff recipes instead of tome / atedm at --ratio")
    parser.add_argument("--no-peer", action="store_true", help="leave tomesd out")
    parser.add_argument("--clock", action="store_true",
                        help="sd15-arch: also time the downsample-1 transformer modules, where the variants differ")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    if not args.plot_only:
        torch.set_num_threads(2)
        started = time.time()
        for model in args.model or list(PATCH):
            pipe = effdiff.load(model)
            rows = []
            for px in args.px or (256, 384, 512):
                rows += measure(model, pipe, px, args)
                print(f"saved {save(rows, args, started)}", flush=True)  # per size: a cut-off run keeps rows
            del pipe
    print(f"plot {plot()}")


if __name__ == "__main__":
    main()
