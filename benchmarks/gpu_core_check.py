"""The core-redesign issue's GPU checks in one run (under 8 minutes on an H200), or at tiny sizes on CPU.

1. FLUX.1-dev configuration (random weights, bf16, 1024 px, 28 steps, guidance 3.5) through a stock
   ``FluxPipeline`` fed random prompt embeddings (no text encoders needed): baseline; diffusers'
   ``TaylorSeerCacheConfig()`` vs effdiff ``taylorseer`` at the same schedule (interval 5, first 3 steps
   computed, order 1; with diffusers' unit, attention outputs, and variable, the step index, outputs compared
   for bit-identity) and at effdiff's default (attention and MLP outputs, before their gates); diffusers'
   ``FirstBlockCacheConfig(threshold=0.05)`` vs effdiff ``fbcache:threshold=0.05,warmup=0`` (the same rule:
   outputs compared for bit-identity); effdiff ``tome`` / ``atedm`` on the MMDiT's image tokens.
2. SD 1.5 twin U-Net (fp16, 512 px, DDIM 50, CFG 7.5) through a stock ``StableDiffusionPipeline`` fed random
   prompt embeddings: each cache eager and on ``unet.compile()`` (Inductor), speed-up over the eager and over
   the *compiled* baseline, and the retained fraction (the issue's target: >= 0.85).

Same process, baseline and variants alternating, median of ``--reps`` after a warm-up call per variant.
Writes JSON and a markdown table to ``--out``.

    python benchmarks/gpu_core_check.py --out DIR [--device cuda] [--tiny] [--reps 3]
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

import effdiff
from effdiff.zoo.twins import FLUX_DEV

FLUX_TINY = {"patch_size": 1, "in_channels": 16, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16,
             "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 16, "guidance_embeds": True,
             "axes_dims_rope": (4, 4, 8)}
TAYLOR_MATCH = "taylorseer:interval=5,warmup=3,order=1,position=step,layers=attention"  # diffusers' defaults
SD15_UNET = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
             "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8,
             "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
             "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3}
SD_TINY_UNET = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
                "block_out_channels": (8, 16), "cross_attention_dim": 16, "attention_head_dim": 4, "norm_num_groups": 4,
                "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")}
DDPM = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}


def vae(tiny: bool, latent: int, **extra: Any):
    from diffusers import AutoencoderKL

    blocks = (8, 8) if tiny else (128, 256, 512, 512)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent, layers_per_block=1 if tiny else 2,
                         block_out_channels=blocks, norm_num_groups=4 if tiny else 32,
                         down_block_types=("DownEncoderBlock2D",) * len(blocks),
                         up_block_types=("UpDecoderBlock2D",) * len(blocks), **extra)


def flux_case(args: argparse.Namespace, device: str) -> tuple[Any, Callable[[], Any]]:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = FLUX_TINY if args.tiny else FLUX_DEV
    transformer = FluxTransformer2DModel(**config).to(device, dtype)
    latent = config["in_channels"] // 4
    flux_vae = vae(args.tiny, latent, shift_factor=0.1159, scaling_factor=0.3611).to(device, dtype)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=flux_vae,
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                        transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(0)
    embeds = torch.randn(1, 16 if args.tiny else 512, config["joint_attention_dim"], generator=generator)
    pooled = torch.randn(1, config["pooled_projection_dim"], generator=generator)
    size = 32 if args.tiny else 1024

    def run() -> Any:
        return pipe(prompt_embeds=embeds.to(device, dtype), pooled_prompt_embeds=pooled.to(device, dtype),
                    height=size, width=size, num_inference_steps=4 if args.tiny else 28, guidance_scale=3.5,
                    generator=torch.Generator("cpu").manual_seed(1), output_type="pt").images

    return pipe, run


def sd_case(args: argparse.Namespace, device: str) -> tuple[Any, Callable[[], Any]]:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    dtype = torch.float16 if device == "cuda" else torch.float32
    unet = UNet2DConditionModel(**(SD_TINY_UNET if args.tiny else SD15_UNET)).to(device, dtype)
    pipe = StableDiffusionPipeline(vae=vae(args.tiny, 4).to(device, dtype), text_encoder=None, tokenizer=None,
                                   unet=unet, scheduler=DDIMScheduler(**DDPM), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(0)
    width = unet.config.cross_attention_dim
    embeds, negative = (torch.randn(1, 77, width, generator=generator) for _ in range(2))
    size = getattr(args, "size", None) or (16 if args.tiny else 512)

    def run() -> Any:
        return pipe(prompt_embeds=embeds.to(device, dtype), negative_prompt_embeds=negative.to(device, dtype),
                    height=size, width=size, num_inference_steps=6 if args.tiny else 50, guidance_scale=7.5,
                    generator=torch.Generator("cpu").manual_seed(1), output_type="pt").images

    return pipe, run


def timed(run: Callable[[], Any], device: str) -> tuple[float, Any]:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        out = run()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def measure(run: Callable[[], Any], variants: dict[str, tuple[Callable[[], None], Callable[[], None]]],
            reps: int, device: str) -> dict[str, dict[str, Any]]:
    """Each variant (on, off) is warmed up once, then rounds alternate the baseline and every variant."""
    results: dict[str, dict[str, Any]] = {}
    for name, (on, off) in variants.items():
        on()
        first, out = timed(run, device)
        off()
        results[name] = {"first_call_s": first, "times": [], "ratios": [], "image": out.float().cpu()}
    base_first, base_image = timed(run, device)
    results["baseline"] = {"first_call_s": base_first, "times": [], "image": base_image.float().cpu()}
    for _ in range(reps):
        base, _ = timed(run, device)
        results["baseline"]["times"].append(base)
        for name, (on, off) in variants.items():
            on()
            seconds, _ = timed(run, device)
            off()
            results[name]["times"].append(seconds)
            results[name]["ratios"].append(base / seconds)
    for name, row in results.items():
        row["median_s"] = statistics.median(row["times"])
        if name != "baseline":
            row["speedup"] = statistics.median(row["ratios"])
            row["max_abs_diff_vs_baseline"] = float((row["image"] - results["baseline"]["image"]).abs().max())
    return results


def effdiff_variant(pipe: Any, recipe: str) -> tuple[Callable[[], None], Callable[[], None]]:
    return lambda: effdiff.accelerate(pipe, recipe), lambda: pipe.effdiff.remove()


def diffusers_variant(model: Any, config: Any) -> tuple[Callable[[], None], Callable[[], None]]:
    return lambda: model.enable_cache(config), model.disable_cache


def flux_checks(args: argparse.Namespace, device: str) -> dict[str, Any]:
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    pipe, run = flux_case(args, device)
    variants = {
        "diffusers TaylorSeerCacheConfig()": diffusers_variant(pipe.transformer, TaylorSeerCacheConfig()),
        TAYLOR_MATCH: effdiff_variant(pipe, TAYLOR_MATCH),
        "taylorseer": effdiff_variant(pipe, "taylorseer"),
        "diffusers FirstBlockCacheConfig(threshold=0.05)": diffusers_variant(pipe.transformer,
                                                                              FirstBlockCacheConfig(threshold=0.05)),
        "effdiff fbcache:threshold=0.05,warmup=0": effdiff_variant(pipe, "fbcache:threshold=0.05,warmup=0"),
        "tome:ratio=0.5": effdiff_variant(pipe, "tome:ratio=0.5"),
        "atedm:ratio=0.5": effdiff_variant(pipe, "atedm:ratio=0.5"),
    }
    results = measure(run, variants, args.reps, device)
    a = results["diffusers FirstBlockCacheConfig(threshold=0.05)"]["image"]
    b = results["effdiff fbcache:threshold=0.05,warmup=0"]["image"]
    c = results["diffusers TaylorSeerCacheConfig()"]["image"]
    d = results[TAYLOR_MATCH]["image"]
    return {"results": results, "fbcache_identical_to_diffusers": bool(torch.equal(a, b)),
            "fbcache_max_abs_diff_to_diffusers": float((a - b).abs().max()),
            "taylorseer_identical_to_diffusers": bool(torch.equal(c, d)),
            "taylorseer_max_abs_diff_to_diffusers": float((c - d).abs().max())}


def compile_checks(args: argparse.Namespace, device: str) -> dict[str, Any]:
    pipe, run = sd_case(args, device)
    recipes = ["deepcache:interval=3", "fbcache:threshold=0.1", "taylorseer"]
    eager = measure(run, {r: effdiff_variant(pipe, r) for r in recipes}, args.reps, device)
    pipe.unet.compile(**({"backend": "eager"} if args.tiny else {}))
    compiled = measure(run, {r: effdiff_variant(pipe, r) for r in recipes}, args.reps, device)
    retained = {r: compiled[r]["speedup"] / eager[r]["speedup"] for r in recipes}
    return {"eager": eager, "compiled": compiled, "retained": retained,
            "compiled_baseline_over_eager": eager["baseline"]["median_s"] / compiled["baseline"]["median_s"]}


def table(report: dict[str, Any]) -> str:
    lines = ["| check | variant | median s | speed-up | first call s | max abs diff vs baseline |",
             "|---|---|---|---|---|---|"]
    for section in ("flux", "sd_eager", "sd_compiled"):
        for name, row in report[section].items():
            lines.append(f"| {section} | {name} | {row['median_s']:.3f} | {row.get('speedup', 1.0):.2f}x | "
                         f"{row['first_call_s']:.1f} | {row.get('max_abs_diff_vs_baseline', 0.0):.3g} |")
    lines.append("")
    lines.append(f"fbcache bit-identical to diffusers' FirstBlockCache: {report['fbcache_identical_to_diffusers']}")
    lines.append(f"taylorseer bit-identical to diffusers' TaylorSeer: {report['taylorseer_identical_to_diffusers']}")
    retained = ", ".join(f"{k} {v:.2f}" for k, v in report["retained"].items())
    lines.append(f"retained over the compiled baseline: {retained}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny configs: check the script on a CPU")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    flux = flux_checks(args, args.device)
    sd = compile_checks(args, args.device)
    strip = lambda rows: {k: {kk: vv for kk, vv in v.items() if kk != "image"} for k, v in rows.items()}  # noqa: E731
    report = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
              "tiny": args.tiny, "flux": strip(flux["results"]),
              "fbcache_identical_to_diffusers": flux["fbcache_identical_to_diffusers"],
              "fbcache_max_abs_diff_to_diffusers": flux["fbcache_max_abs_diff_to_diffusers"],
              "taylorseer_identical_to_diffusers": flux["taylorseer_identical_to_diffusers"],
              "taylorseer_max_abs_diff_to_diffusers": flux["taylorseer_max_abs_diff_to_diffusers"],
              "sd_eager": strip(sd["eager"]), "sd_compiled": strip(sd["compiled"]), "retained": sd["retained"],
              "compiled_baseline_over_eager": sd["compiled_baseline_over_eager"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_core_check.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_core_check.md").write_text(table(report) + "\n")
    print(table(report))


if __name__ == "__main__":
    main()
