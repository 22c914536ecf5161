"""The GPU benchmark suite: effdiff beside its peers on the three model classes people accelerate, in one process.

Random-weight twins built on the device (speed only; prompt embeddings passed directly, no text encoder):

1. ``sd15``: SD 1.5's U-Net at 512 px, DDIM 50 + CFG 7.5, fp16 — effdiff ``deepcache`` vs the ``deepcache``
   package, ``tome`` vs ``tomesd`` (same ratio), ``todo``, ``int8`` (torchao's W8A8 on CUDA, layers measured),
   ``fp8``; the best training-free stack (``dpmpp2m:steps=20+deepcache:interval=3``) eager, and compiled
   (``+compile``), against the *eager* DDIM-50 baseline (the issue's target: >= 10x).
2. ``sd15-1024``: the same U-Net at 1024 px (ToDo's setting), ``todo:factor=2`` and ``tome:ratio=0.75`` (the same
   number of keys removed at full resolution).
3. ``pixart``: PixArt-XL-2 at 1024 px, DDIM 20 + CFG 4.5, fp16 — ``taylorseer``, ``fbcache``, ``fora``, ``todo``,
   ``tome``, ``fp8``.
4. ``flux``: FLUX.1-dev's configuration at 1024 px, 28 steps, bf16 — ``fp8`` vs plain torchao float8 (the whole
   transformer through ``quantize_``, as torchao's README does it), eager and compiled, and ``fora``.

Baseline and variants alternate in one process; median of ``--reps`` after a warm-up call per variant (the
helpers of ``gpu_core_check.py``). Writes ``gpu_suite.json`` and ``gpu_suite.md`` to ``--out``.

It needs torch with CUDA and nothing of ours installed: on the lent GPU machine, carry wheels of diffusers,
deepcache, tomesd and torchao (``../shared`` or the device README's ``.whl`` recipe) and start with
``python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src``.

    python benchmarks/gpu_suite.py --out DIR [--sections sd15 sd15-1024 pixart flux] [--reps 3]
    python benchmarks/gpu_suite.py --out DIR --tiny        # the whole script at toy sizes on a CPU
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from gpu_core_check import DDPM, effdiff_variant, flux_case, measure, sd_case, vae

SECTIONS = ("sd15", "sd15-1024", "pixart", "flux")
Variant = tuple[Callable[[], None], Callable[[], None]]
PIXART_XL = {"sample_size": 128, "num_layers": 28, "attention_head_dim": 72, "num_attention_heads": 16,
             "in_channels": 4, "out_channels": 8, "patch_size": 2, "cross_attention_dim": 1152,
             "caption_channels": 4096, "norm_type": "ada_norm_single", "use_additional_conditions": True}
PIXART_TINY = {"sample_size": 4, "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2, "in_channels": 4,
               "out_channels": 8, "patch_size": 2, "cross_attention_dim": 16, "caption_channels": 32,
               "norm_type": "ada_norm_single", "use_additional_conditions": False}


def on_cuda(args: argparse.Namespace) -> bool:
    return args.device == "cuda"


def package_variant(apply: Callable[[], None], remove: Callable[[], None]) -> Variant:
    return apply, remove


def deepcache_package(pipe: Any) -> Variant:
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    return helper.enable, helper.disable


def tomesd_package(pipe: Any, ratio: float) -> Variant:
    import tomesd

    return (lambda: tomesd.apply_patch(pipe, ratio=ratio)), (lambda: tomesd.remove_patch(pipe))


def swapped_model(pipe: Any, attr: str, make: Callable[[Any], Any]) -> Variant:
    """A variant that swaps ``pipe.<attr>`` for ``make(copy of it)`` (built once, on first use)."""
    original, built = getattr(pipe, attr), {}

    def on() -> None:
        if "model" not in built:
            built["model"] = make(copy.deepcopy(original))
        setattr(pipe, attr, built["model"])

    return on, lambda: setattr(pipe, attr, original)


def torchao_float8(model: Any) -> Any:
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    return model


def available(variants: dict[str, Variant], args: argparse.Namespace, names: dict[str, Callable[[], Variant]]
              ) -> dict[str, Variant]:
    """``variants`` plus each of ``names`` whose package imports and whose kernel this device runs (each is
    switched on and off once here, so a refusal skips it instead of ending the run)."""
    from effdiff.registry import RecipeError

    for name, build in names.items():
        try:
            on, off = build()
            on()
            off()
        except (ImportError, RuntimeError, RecipeError) as exc:
            print(f"  skipped {name}: {exc}", flush=True)
            continue
        variants[name] = (on, off)
    return variants


def sd15(args: argparse.Namespace) -> dict[str, Any]:
    pipe, run = sd_case(args, args.device)
    variants = {r: effdiff_variant(pipe, r) for r in ("deepcache:interval=3", "tome:ratio=0.5", "todo:factor=2",
                                                       "dpmpp2m:steps=20+deepcache:interval=3")}
    extra = {"deepcache package interval=3": lambda: deepcache_package(pipe),
             "tomesd ratio=0.5": lambda: tomesd_package(pipe, 0.5)}
    if on_cuda(args):
        extra.update({"int8": lambda: effdiff_variant(pipe, "int8"),
                      "fp8": lambda: effdiff_variant(pipe, "fp8")})
    eager = measure(run, available(variants, args, extra), args.reps, args.device)
    stack = "dpmpp2m:steps=20+deepcache:interval=3+compile"
    compiled = measure(run, {stack: effdiff_variant(pipe, stack + (":backend=eager" if args.tiny else ""))},
                       args.reps, args.device)
    compiled[stack]["speedup_over_eager_baseline"] = eager["baseline"]["median_s"] / compiled[stack]["median_s"]
    return {"eager": eager, "compiled": compiled}


def sd15_1024(args: argparse.Namespace) -> dict[str, Any]:
    big = argparse.Namespace(**{**vars(args), "size": 64 if args.tiny else 1024})
    pipe, run = sd_case(big, args.device)
    variants = {r: effdiff_variant(pipe, r) for r in ("todo:factor=2", "tome:ratio=0.75")}
    return {"eager": measure(run, variants, args.reps, args.device)}


def pixart_case(args: argparse.Namespace) -> tuple[Any, Callable[[], Any]]:
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    dtype = torch.float16 if on_cuda(args) else torch.float32
    config = PIXART_TINY if args.tiny else PIXART_XL
    transformer = PixArtTransformer2DModel(**config).to(args.device, dtype)
    pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=vae(args.tiny, 4).to(args.device, dtype),
                               transformer=transformer, scheduler=DDIMScheduler(**DDPM))
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(0)
    tokens = 8 if args.tiny else 120
    embeds, negative = (torch.randn(1, tokens, config["caption_channels"], generator=generator) for _ in range(2))
    mask = torch.ones(1, tokens)
    size = 32 if args.tiny else 1024

    def run() -> Any:
        return pipe(prompt_embeds=embeds.to(args.device, dtype), prompt_attention_mask=mask.to(args.device),
                    negative_prompt_embeds=negative.to(args.device, dtype),
                    negative_prompt=None, negative_prompt_attention_mask=mask.to(args.device), height=size, width=size,
                    num_inference_steps=4 if args.tiny else 20, guidance_scale=4.5, use_resolution_binning=False,
                    generator=torch.Generator("cpu").manual_seed(1), output_type="pt").images

    return pipe, run


def pixart(args: argparse.Namespace) -> dict[str, Any]:
    pipe, run = pixart_case(args)
    variants = {r: effdiff_variant(pipe, r) for r in ("taylorseer:interval=5,order=1,warmup=3", "fbcache:threshold=0.2",
                                                       "fora", "todo:factor=2", "tome:ratio=0.5")}
    extra = {"fp8": lambda: effdiff_variant(pipe, "fp8")} if on_cuda(args) else {}
    return {"eager": measure(run, available(variants, args, extra), args.reps, args.device)}


def flux(args: argparse.Namespace) -> dict[str, Any]:
    pipe, run = flux_case(args, args.device)
    variants = {"fora": effdiff_variant(pipe, "fora")}
    extra = {}
    if on_cuda(args):
        extra = {"fp8": lambda: effdiff_variant(pipe, "fp8"),
                 "torchao float8 (whole transformer)": lambda: swapped_model(pipe, "transformer", torchao_float8)}
    eager = measure(run, available(variants, args, extra), args.reps, args.device)
    out = {"eager": eager}
    if on_cuda(args) and not args.no_compile:
        compiled_variants = available({}, args, {
            "fp8+compile": lambda: effdiff_variant(pipe, "fp8+compile"),
            "torchao float8 + torch.compile": lambda: swapped_model(
                pipe, "transformer", lambda m: torch.compile(torchao_float8(m)))})
        out["compiled"] = measure(run, compiled_variants, args.reps, args.device)
    return out


def strip(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {k: {kk: vv for kk, vv in v.items() if kk != "image"} for k, v in rows.items()}


def table(report: dict[str, Any]) -> str:
    lines = [f"device: {report['device']}, torch {report['torch']}", "",
             "| section | mode | variant | median s | speed-up | max abs diff vs baseline |",
             "|---|---|---|---|---|---|"]
    for section, modes in report["sections"].items():
        for mode, rows in modes.items():
            for name, row in rows.items():
                lines.append(f"| {section} | {mode} | {name} | {row['median_s']:.3f} | "
                             f"{row.get('speedup', 1.0):.2f}x | {row.get('max_abs_diff_vs_baseline', 0.0):.3g} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--tiny", action="store_true", help="toy sizes: check the script on a CPU")
    parser.add_argument("--no-compile", action="store_true", help="leave out FLUX's compiled rows (minutes)")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    runners = {"sd15": sd15, "sd15-1024": sd15_1024, "pixart": pixart, "flux": flux}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if on_cuda(args) else "cpu",
                              "torch": torch.__version__, "tiny": args.tiny, "sections": {}}
    for section in args.sections:
        print(f"== {section}", flush=True)
        report["sections"][section] = {mode: strip(rows) for mode, rows in runners[section](args).items()}
        (out / "gpu_suite.json").write_text(json.dumps(report, indent=1))  # after each: a timeout keeps the rest
        (out / "gpu_suite.md").write_text(table(report) + "\n")
    print(table(report))


if __name__ == "__main__":
    main()
