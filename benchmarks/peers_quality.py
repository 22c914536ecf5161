"""FID, KID and prompt accuracy of the peer packages beside effdiff's twin of each, through ``run_bench``.

The peers (the ``deepcache`` package, diffusers' cache hooks, ``tomesd``) are installed by the same
functions ``cache_peers.py`` and ``tokens_peers.py`` time them with; here a recipe ``peer:<name>`` puts
one on the pipeline and leaves a stand-in ``pipe.effdiff`` handle whose ``remove()`` takes it off again.
So the peers get exactly the bench's measurement: same 100 prompts and per-sample seeds, speed-up at
the bench's batch alternating with the baseline, FID/KID vs the held-out digits beside the real-vs-real
floor, prompt accuracy, PSNR/SSIM vs the baseline's images; rows land in the results store and report.

    PYTHONPATH=src HF_HUB_OFFLINE=1 python benchmarks/peers_quality.py [--samples 100] [--models tiny-sd tiny-dit]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cache_peers import deepcache_peer, diffusers_hook
from tokens_breakeven import tomesd_switch

import effdiff
from effdiff.bench.report import report
from effdiff.bench.runner import run_bench
from effdiff.registry import RecipeError

# Each peer beside the effdiff recipe with the same settings.
RECIPES = {
    "tiny-sd": ["peer:deepcache", "deepcache:interval=3,branch=0",
                "peer:tomesd", "tome:ratio=0.5,max_downsample=2"],
    "tiny-dit": ["peer:diffusers-fbcache", "fbcache:threshold=0.1,warmup=0",
                 "peer:diffusers-taylorseer", "taylorseer:interval=5,order=1,warmup=3",
                 "peer:diffusers-pab"],
}
DESCRIBE = {
    "deepcache": "deepcache package DeepCacheSDHelper(cache_interval=3, cache_branch_id=0)",
    "tomesd": "tomesd.apply_patch(ratio=0.5, max_downsample=2)",
    "diffusers-fbcache": "diffusers FirstBlockCacheConfig(threshold=0.1), with cache_peers.py's hand fixes",
    "diffusers-taylorseer": "diffusers TaylorSeerCacheConfig(cache_interval=5, max_order=1, "
                            "disable_cache_before_step=3), with cache_peers.py's hand fixes",
    "diffusers-pab": "diffusers PyramidAttentionBroadcastConfig(spatial 2, cross 4), with cache_peers.py's hand fixes",
}


def peer_switch(pipe: Any, name: str) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """The peer's (install, remove) pair; a peer on a backbone it does not patch is refused like a recipe."""
    needs = "transformer" if name.startswith("diffusers-") else "unet"
    if not hasattr(pipe, needs):
        raise RecipeError(f"peer {name} patches a pipeline's {needs}; {type(pipe).__name__} has none")
    if name == "deepcache":
        return deepcache_peer(pipe)
    if name == "tomesd":
        return tomesd_switch(pipe, ratio=0.5, max_downsample=2)
    if name.startswith("diffusers-") and name in DESCRIBE:
        return diffusers_hook(pipe, name.removeprefix("diffusers-"))
    raise RecipeError(f"unknown peer {name!r}; known: {', '.join(DESCRIBE)}")


class PeerHandle:
    """Stands in for ``pipe.effdiff`` while a peer is installed, so the bench switches it like a recipe."""

    labels = ["peer"]

    def __init__(self, pipe: Any, name: str, leave: Callable[[], Any]) -> None:
        self.pipe, self.name, self._leave = pipe, name, leave
        pipe.__dict__["effdiff"] = self

    def describe(self) -> str:
        return DESCRIBE[self.name]

    def remove(self) -> None:
        self._leave()
        self.pipe.__dict__.pop("effdiff", None)


def accelerate(pipe: Any, recipe: str) -> Any:
    """``effdiff.accelerate``, or for ``peer:<name>`` the peer package with a removable handle."""
    if not recipe.startswith("peer:"):
        return effdiff.accelerate(pipe, recipe)
    name = recipe.removeprefix("peer:")
    enter, leave = peer_switch(pipe, name)
    enter()
    return PeerHandle(pipe, name, leave)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/peers-quality"))
    parser.add_argument("--resume", metavar="RUN_ID", help="with one --models entry: finish that run")
    args = parser.parse_args()
    if args.resume and len(args.models) != 1:
        parser.error("--resume finishes one model's run: pass that model alone with --models")
    for model in args.models:  # one run per model: each model has its own peers
        run_id = run_bench([model], ["", *RECIPES[model]], samples=args.samples, out_dir=args.out,
                           resume_run_id=args.resume, accelerate_fn=accelerate)
        print(f"{model}: run {run_id}, report {report(args.out, run_id, args.out / f'report-{model}.html')}")


if __name__ == "__main__":
    main()
