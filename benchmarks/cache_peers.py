"""Feature caching side by side with the peers: same pipeline, prompts and seeds, one process.

(a) the ``deepcache`` package's ``DeepCacheSDHelper`` vs effdiff ``deepcache`` on tiny-sd (and, with
    ``--sd15``, on sd15-arch at 256 px / 20 DDIM steps; ``--only pixart``: (b) on pixart-alpha-arch);
(b) diffusers' built-in cache hooks (FirstBlockCache, TaylorSeer, PyramidAttentionBroadcast) vs effdiff's
    methods on tiny-dit. PixArt needs hand fixes for the hooks; every one is listed in ``HOOK_FIXES``;
(c) effdiff's default settings of every cache method on tiny-sd and tiny-dit;
(d) ``--only cache-dit``: the ``cache-dit`` package (DBCache Fn/Bn, its TaylorSeer calibrator) vs effdiff's
    ``fbcache`` with the same front/back/threshold/warmup on tiny-dit and pixart-alpha-arch.

Timing: ``time_alternating`` (baseline and variant alternate, median of ``--reps``). Fidelity: PSNR/SSIM of
the variant's images vs the baseline's (same noise). ``flop_ratio`` = baseline FLOPs / variant FLOPs of
one call (``count_flops``); ``efficiency`` = speed-up / flop_ratio (the issue asks for >= 0.85).

    HF_HUB_OFFLINE=1 python benchmarks/cache_peers.py [--reps 3] [--steps 50] [--sd15] [--only pixart --twin-prompts 1]
    HF_HUB_OFFLINE=1 python benchmarks/cache_peers.py --only cache-dit --twin-prompts 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import effdiff
from effdiff.eval.cost import NFECounter, count_flops, time_alternating
from effdiff.eval.fidelity import fidelity, psnr
from effdiff.host import cpu_description

PROMPTS = ["a handwritten seven", "a handwritten three"]
HOOK_FIXES = [
    "PixArtTransformer2DModel has no enable_cache (no CacheMixin): hooks applied with diffusers.hooks.apply_* "
    "directly on pipe.transformer",
    "the pipeline never opens a cache context: a forward pre-hook on the transformer sets "
    "CacheContext('batched') before every call (diffusers.hooks.hooks._set_cache_context)",
    "HookRegistry caches its child-registry list: invalidate_child_registries_cache() after applying/removing, "
    "or the context never reaches hooks applied after the first",
    "hook state is not reset between pipeline calls: the same pre-hook calls HookRegistry.reset_stateful_hooks() "
    "when the timestep rises (a new generation)",
    "TaylorSeer's default cache_identifiers ('^transformer_blocks.*attn', re.fullmatch) hook nothing on PixArt "
    "(layers are attn1/attn2): cache_identifiers=[r'transformer_blocks\\.\\d+\\.(attn1|attn2|ff)']",
    "PyramidAttentionBroadcast needs current_timestep_callback: the same pre-hook records the timestep",
]


def measure(name: str, pipe: Any, run: Callable[[], torch.Tensor], enter: Callable[[], Any],
            leave: Callable[[], Any], reference: torch.Tensor, reps: int, base_flops: int | None) -> dict[str, Any]:
    """Speed-up (alternating medians), FLOP ratio, NFE and fidelity of one variant against the baseline."""
    base_t, var_t = time_alternating(run, run, reps=reps, warmup=1, enter_variant=enter, exit_variant=leave)
    row: dict[str, Any] = {"variant": name, "baseline_s": round(base_t.median, 4),
                           "variant_s": round(var_t.median, 4), "speedup": round(base_t.median / var_t.median, 3),
                           "spread": round(max(base_t.spread, var_t.spread), 3)}
    enter()
    try:
        denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
        with NFECounter(denoiser) as nfe:
            images = run()
        row["nfe"] = nfe.calls
        handle = pipe.__dict__.get("effdiff")
        if handle is not None and handle.methods and hasattr(handle.methods[-1], "stats"):
            stats = handle.methods[-1].stats
            row["cached_calls"] = stats.cached
        if base_flops:
            with count_flops() as variant_flops:
                run()
    finally:
        leave()
    if base_flops:
        row["flop_ratio"] = round(base_flops / max(variant_flops.flops, 1), 3)
        row["efficiency"] = round(row["speedup"] / row["flop_ratio"], 3)
    row.update({k: round(v, 3) for k, v in fidelity(images, reference).items()})
    row["_images"] = images
    print(f"  {name:44s} {row['speedup']:6.2f}x  psnr {row['psnr']:6.2f}  flop ratio "
          f"{row.get('flop_ratio', float('nan')):5.2f}  ({row['baseline_s']:.3f}s -> {row['variant_s']:.3f}s)",
          flush=True)
    return row


def effdiff_variant(pipe: Any, recipe: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
    return (lambda: effdiff.accelerate(pipe, recipe)), (lambda: pipe.effdiff.remove())


def deepcache_peer(pipe: Any, interval: int = 3, branch: int = 0) -> tuple[Callable[[], Any], Callable[[], Any]]:
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    return helper.enable, helper.disable


def diffusers_hook(pipe: Any, kind: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """Apply one of diffusers' cache hooks to a PixArt-style transformer, with the hand fixes it needs."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    model = pipe.transformer
    kind, _, threshold = kind.partition("=")  # "fbcache=0.2": FirstBlockCache's threshold (default 0.1)
    timestep: dict[str, int | None] = {"t": None}
    handles: list[Any] = []
    names = {"fbcache": ["fbc_leader_block_hook", "fbc_block_hook"], "taylorseer": ["taylorseer_cache"],
             "pab": ["pyramid_attention_broadcast"]}[kind]

    def pre(module: Any, args: tuple, kwargs: dict) -> None:
        t = kwargs.get("timestep")
        now = int(t.flatten()[0]) if isinstance(t, torch.Tensor) else int(t or 0)
        if timestep["t"] is None or now > timestep["t"]:  # timesteps only fall within a generation: a new one
            HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks()
        timestep["t"] = now
        _set_cache_context(model, CacheContext("batched"))

    def enter() -> None:
        from diffusers import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig
        from diffusers.hooks import (
            apply_first_block_cache,
            apply_pyramid_attention_broadcast,
            apply_taylorseer_cache,
        )

        if kind == "fbcache":
            apply_first_block_cache(model, FirstBlockCacheConfig(threshold=float(threshold or 0.1)))
        elif kind == "taylorseer":
            apply_taylorseer_cache(model, TaylorSeerCacheConfig(
                cache_interval=5, max_order=1, disable_cache_before_step=3, taylor_factors_dtype=torch.float32,
                cache_identifiers=[r"transformer_blocks\.\d+\.(attn1|attn2|ff)"]))
        else:
            apply_pyramid_attention_broadcast(model, PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=2, cross_attention_block_skip_range=4,
                current_timestep_callback=lambda: timestep["t"]))
        HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
        timestep["t"] = None
        handles.append(model.register_forward_pre_hook(pre, with_kwargs=True))

    def leave() -> None:
        registry = HookRegistry.check_if_exists_or_initialize(model)
        for name in names:
            registry.remove_hook(name, recurse=True)
        registry.invalidate_child_registries_cache()
        while handles:
            handles.pop().remove()

    return enter, leave


def cachedit_peer(pipe: Any, kind: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """The ``cache-dit`` package on a PixArt-style pipeline: ``F<n>B<m>=<threshold>[,w=<warmup>][+taylorseer]``,
    or ``dbcache`` for its defaults (F8B0, threshold 0.08, 8 warm-up steps).

    Its ``enable_cache`` patches the pipeline *class*'s ``__call__``: the pipeline gets a private subclass
    while cached, so other pipelines of the class stay untouched; ``disable_cache`` leaves the transformer's
    ``forward`` as an instance attribute, removed here (the baseline is checked bit-identical afterwards).
    """
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")
    import cache_dit
    from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern, TaylorSeerCalibratorConfig

    original = type(pipe)
    spec, _, calibrator = kind.partition("+")

    def config() -> Any:  # fresh per enable: cache-dit writes into the config it is given
        if spec == "dbcache":
            return DBCacheConfig()
        blocks, _, settings = spec.partition("=")
        threshold, _, warmup = settings.partition(",w=")
        front, _, back = blocks[1:].partition("B")
        return DBCacheConfig(Fn_compute_blocks=int(front), Bn_compute_blocks=int(back),
                             residual_diff_threshold=float(threshold), max_warmup_steps=int(warmup or 1))

    def enter() -> None:
        pipe.__class__ = type(original.__name__, (original,), {})
        adapter = BlockAdapter(pipe=pipe, transformer=pipe.transformer, blocks=pipe.transformer.transformer_blocks,
                               forward_pattern=ForwardPattern.Pattern_3)
        calibration = TaylorSeerCalibratorConfig(taylorseer_order=1) if calibrator == "taylorseer" else None
        cache_dit.enable_cache(adapter, cache_config=config(), calibrator_config=calibration)

    def leave() -> None:
        cache_dit.disable_cache(pipe)
        vars(pipe.transformer).pop("forward", None)
        pipe.__class__ = original

    return enter, leave


def runner(pipe: Any, steps: int, prompts: list[str], **kwargs: Any) -> Callable[[], torch.Tensor]:
    """One seeded generation of ``prompts`` (a peer's hooks, if installed, reset themselves per generation)."""
    def run() -> torch.Tensor:
        generator = torch.Generator("cpu").manual_seed(0)
        out = pipe(prompts, num_inference_steps=steps, guidance_scale=4.0, generator=generator, output_type="pt",
                   **kwargs).images
        return torch.as_tensor(out).float()

    return run


def section(title: str, model: str, steps: int, variants: list[tuple[str, str]], reps: int,
            call_kwargs: dict[str, Any] | None = None, flops: bool = True,
            only: list[str] | None = None, prompts: list[str] = PROMPTS) -> list[dict[str, Any]]:
    """variants: (label, spec) where spec is 'effdiff:<recipe>', 'deepcache-pkg', 'diffusers:<kind>' or
    'cache-dit:<kind>'."""
    print(f"\n== {title}: {model}, {steps} DDIM steps, guidance 4, {len(prompts)} prompts, reps {reps}", flush=True)
    pipe = effdiff.load(model)
    pipe.set_progress_bar_config(disable=True)
    run = runner(pipe, steps, prompts, **(call_kwargs or {}))
    reference = run()
    base_flops = None
    if flops:
        with count_flops() as counted:
            run()
        base_flops = counted.flops
    rows = []
    for label, spec in variants:
        if only and not any(word in label for word in only):
            continue
        source, _, arg = spec.partition(":")
        if source == "effdiff":
            enter, leave = effdiff_variant(pipe, arg)
        elif source == "deepcache-pkg":
            enter, leave = deepcache_peer(pipe)
        elif source == "cache-dit":
            enter, leave = cachedit_peer(pipe, arg)
        else:
            enter, leave = diffusers_hook(pipe, arg)
        try:
            row = measure(label, pipe, run, enter, leave, reference, reps, base_flops)
        except Exception as exc:  # a peer that cannot drive this pipeline is a result, not a crash
            with contextlib.suppress(Exception):  # already failed; leave what can be left
                leave()
            print(f"  {label:44s} FAILED: {type(exc).__name__}: {exc}", flush=True)
            row = {"variant": label, "error": f"{type(exc).__name__}: {exc}"}
        row.update({"model": model, "steps": steps, "spec": spec, "prompts": len(prompts)})
        rows.append(row)
    after = run()
    if not torch.equal(after, reference):
        print("  WARNING: the baseline changed after the variants were removed", flush=True)
    by_label = {r["variant"]: r for r in rows}
    pairs = [("deepcache package", "effdiff deepcache"), ("diffusers FirstBlockCache", "effdiff fbcache"),
             ("diffusers TaylorSeer", "effdiff taylorseer"), ("diffusers FirstBlockCache 0.2", "effdiff fbcache 0.2"),
             ("cache-dit F1B0 0.1", "effdiff fbcache F1B0 0.1"), ("cache-dit F1B0 0.2", "effdiff fbcache F1B0 0.2"),
             ("cache-dit DBCache (default F8B0 0.08 W8)", "effdiff fbcache F8B0 0.08 W8")]
    for a, b in pairs:
        if a in by_label and b in by_label and "_images" in by_label[a] and "_images" in by_label[b]:
            value = psnr(by_label[b]["_images"], by_label[a]["_images"])
            by_label[b][f"psnr_vs_{a.replace(' ', '_')}"] = round(value, 2)
            print(f"  PSNR({b} vs {a}) = {value:.2f} dB", flush=True)
    for row in rows:
        row.pop("_images", None)
    return rows


def save(args: argparse.Namespace, rows: list[dict[str, Any]], started: float) -> dict[str, Any]:
    """Merge ``rows`` into the JSON file (rows of the same model and variant are replaced)."""
    result = {"benchmark": "cache_peers", "when": time.strftime("%Y-%m-%d %H:%M:%S"),
              "machine": f"{cpu_description()} threads={torch.get_num_threads()}",
              "torch": torch.__version__, "prompts": PROMPTS, "guidance": 4.0, "reps": args.reps,
              "hook_fixes": HOOK_FIXES, "seconds": round(time.time() - started, 1), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(out.read_text()) if out.exists() else {}
    fresh = {(r["model"], r["variant"]) for r in rows}
    result["rows"] = [r for r in existing.get("rows", []) if (r.get("model"), r["variant"]) not in fresh] + rows
    out.write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--sd15", action="store_true", help="also run sd15-arch (slow: minutes per variant)")
    parser.add_argument("--twin-steps", type=int, default=20)
    parser.add_argument("--twin-prompts", type=int, default=len(PROMPTS), choices=range(1, len(PROMPTS) + 1),
                        help="prompts per call on the twins (1 halves the minutes per variant)")
    parser.add_argument("--only", choices=("sd", "dit", "sd15", "pixart", "cache-dit"), default=None)
    parser.add_argument("--variants", default="", help="comma-separated substrings: run only matching variants")
    parser.add_argument("--out", default="benchmarks/results/cache_peers.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.time()
    result: dict[str, Any] = {"rows": []}
    only = [w for w in args.variants.split(",") if w] or None
    if args.only in (None, "sd"):
        result = save(args, section("(a) DeepCache vs the deepcache package; effdiff defaults", "tiny-sd", args.steps, [
            ("deepcache package", "deepcache-pkg"),
            ("effdiff deepcache", "effdiff:deepcache:interval=3,branch=0"),
            ("effdiff deepcache quadratic", "effdiff:deepcache:schedule=quadratic"),
            ("effdiff fbcache (default)", "effdiff:fbcache"),
            ("effdiff taylorseer (default)", "effdiff:taylorseer"),
            ("effdiff fora (default)", "effdiff:fora"),
            ("effdiff dpmpp2m (50 steps) + deepcache:interval=2", "effdiff:dpmpp2m+deepcache:interval=2"),
        ], args.reps, only=only), started)  # saved per section: a timed-out run keeps what finished
    if args.only in (None, "dit"):
        result = save(args, section("(b) diffusers hooks vs effdiff; effdiff defaults", "tiny-dit", args.steps, [
            ("diffusers FirstBlockCache", "diffusers:fbcache"),
            ("effdiff fbcache", "effdiff:fbcache:threshold=0.1,warmup=0"),
            ("diffusers TaylorSeer", "diffusers:taylorseer"),
            ("effdiff taylorseer", "effdiff:taylorseer:interval=5,order=1,warmup=3"),
            ("diffusers PyramidAttentionBroadcast", "diffusers:pab"),
            ("effdiff fbcache (default)", "effdiff:fbcache"),
            ("effdiff taylorseer (default)", "effdiff:taylorseer"),
            ("effdiff fora (default)", "effdiff:fora"),
            ("effdiff deltadit (default)", "effdiff:deltadit"),
        ], args.reps, only=only), started)  # saved per section: a timed-out run keeps what finished
    if args.sd15 or args.only == "sd15":
        result = save(args, section("(a') DeepCache vs the package at SD 1.5 scale", "sd15-arch", args.twin_steps, [
            ("deepcache package", "deepcache-pkg"),
            ("effdiff deepcache", "effdiff:deepcache:interval=3,branch=0"),
        ], args.reps, {"height": 256, "width": 256}, flops=False, only=only,
            prompts=PROMPTS[:args.twin_prompts]), started)
    if args.only == "pixart":
        result = save(args, section("(b') diffusers hooks vs effdiff at PixArt-XL-2 scale", "pixart-alpha-arch",
                                    args.twin_steps, [
            ("diffusers TaylorSeer", "diffusers:taylorseer"),
            ("effdiff taylorseer", "effdiff:taylorseer:interval=5,order=1,warmup=3"),
            ("diffusers FirstBlockCache", "diffusers:fbcache"),
            ("effdiff fbcache", "effdiff:fbcache:threshold=0.1,warmup=0"),
            ("diffusers FirstBlockCache 0.2", "diffusers:fbcache=0.2"),
            ("effdiff fbcache 0.2", "effdiff:fbcache:threshold=0.2,warmup=0"),
        ], args.reps, {"height": 256, "width": 256}, flops=False, only=only,
            prompts=PROMPTS[:args.twin_prompts]), started)
    if args.only == "cache-dit":
        for model, steps, kwargs, prompts, extra in [
                ("tiny-dit", args.steps, None, PROMPTS, []),
                ("pixart-alpha-arch", args.twin_steps, {"height": 256, "width": 256}, PROMPTS[:args.twin_prompts], [
                    ("cache-dit DBCache (default F8B0 0.08 W8)", "cache-dit:dbcache"),
                    ("effdiff fbcache F8B0 0.08 W8", "effdiff:fbcache:front=8,back=0,threshold=0.08,warmup=8")])]:
            result = save(args, section("(d) cache-dit vs effdiff", model, steps, [
                ("cache-dit F1B0 0.1", "cache-dit:F1B0=0.1"),
                ("effdiff fbcache F1B0 0.1", "effdiff:fbcache:front=1,back=0,threshold=0.1,warmup=1"),
                ("cache-dit F1B0 0.2", "cache-dit:F1B0=0.2"),
                ("effdiff fbcache F1B0 0.2", "effdiff:fbcache:front=1,back=0,threshold=0.2,warmup=1"),
                ("cache-dit F1B0 0.2 + TaylorSeer calibrator (order 1)", "cache-dit:F1B0=0.2+taylorseer"),
                ("effdiff taylorseer (default)", "effdiff:taylorseer"),
                *extra,
            ], args.reps, kwargs, flops=model == "tiny-dit", only=only, prompts=prompts), started)
    print(f"\n{'model':10s} {'variant':46s} {'speedup':>8s} {'psnr':>7s} {'ssim':>6s} {'flops÷':>7s} {'eff':>5s}")
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['model']:10s} {r['variant']:46s} ERROR {r['error'][:60]}")
            continue
        print(f"{r['model']:10s} {r['variant']:46s} {r['speedup']:8.2f} {r['psnr']:7.2f} {r['ssim']:6.3f} "
              f"{r.get('flop_ratio', float('nan')):7.2f} {r.get('efficiency', float('nan')):5.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
