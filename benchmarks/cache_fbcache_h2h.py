"""FirstBlockCache head to head at the bench's batch: baseline, diffusers' hook and effdiff in every round.

The bench times each recipe against its own baseline with 3 alternating reps, so two recipes with the same
skips can read 10 % apart. Here tiny-dit runs the bench's batch (4 prompts, CFG, DDIM 50, guidance 4) with
baseline, ``FirstBlockCacheConfig(threshold=0.1)`` (``cache_peers.py``'s hand fixes) and effdiff
``fbcache:threshold=0.1,warmup=0`` in turn each round (``tokens_breakeven.round_robin``), and checks that
the two caches give the same images.

    PYTHONPATH=src HF_HUB_OFFLINE=1 python benchmarks/cache_fbcache_h2h.py [rounds, default 7]
"""

import statistics
import sys

import torch
from cache_peers import diffusers_hook, effdiff_variant, runner
from tokens_breakeven import round_robin

import effdiff

PROMPTS = [f"a handwritten {word}" for word in ("zero", "one", "two", "three")]

torch.set_num_threads(2)
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 7
pipe = effdiff.load("tiny-dit")
pipe.set_progress_bar_config(disable=True)
switch = {"baseline": (lambda: None, lambda: None), "diffusers hook": diffusers_hook(pipe, "fbcache"),
          "effdiff": effdiff_variant(pipe, "fbcache:threshold=0.1,warmup=0")}
times, outputs, _, _ = round_robin(switch, runner(pipe, 50, PROMPTS), rounds, "tiny-dit")
base = statistics.median(times["baseline"])
for name, seconds in times.items():
    med = statistics.median(seconds)
    print(f"{name:15s} median {med:.3f}s  speed-up {base / med:.2f}x  rounds {min(seconds):.3f}-{max(seconds):.3f}s")
print("identical images:", torch.equal(outputs["diffusers hook"], outputs["effdiff"]))
