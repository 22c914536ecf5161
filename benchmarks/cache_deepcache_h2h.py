"""DeepCache head to head: the ``deepcache`` package and effdiff ``deepcache`` alternate inside each round.

``cache_peers.py`` times each variant against its own baseline in a separate section, so a machine that drifts
between sections moves the two speed-ups apart. Here both run in every round (round 0 is warm-up), on sd15-arch
at 256 px, interval 3, branch 0, guidance 4, and every U-Net call is timed, so a real per-call difference
(cached calls included) shows directly. The outputs must be identical.

    HF_HUB_OFFLINE=1 python benchmarks/cache_deepcache_h2h.py [steps, default 6]
"""
import statistics
import sys
import time

import torch
from cache_peers import deepcache_peer, effdiff_variant, runner

import effdiff

torch.set_num_threads(2)
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 6
pipe = effdiff.load("sd15-arch")
pipe.set_progress_bar_config(disable=True)
run = runner(pipe, steps, ["a handwritten seven"], height=256, width=256)
calls: list[float] = []
t0 = {}
pipe.unet.register_forward_pre_hook(lambda m, a: t0.__setitem__("t", time.perf_counter()))
pipe.unet.register_forward_hook(lambda m, a, o: calls.append(time.perf_counter() - t0["t"]))
variants = {"package": deepcache_peer(pipe), "effdiff": effdiff_variant(pipe, "deepcache:interval=3,branch=0")}
totals = {k: [] for k in variants}
percall = {k: [] for k in variants}
outs = {}
for rnd in range(5):
    for name, (enter, leave) in variants.items():
        enter()
        calls.clear()
        start = time.perf_counter()
        outs[name] = run()
        total = time.perf_counter() - start
        leave()
        if rnd == 0:
            continue  # warm-up round
        totals[name].append(total)
        percall[name].append(list(calls))
        print(f"round {rnd} {name:8s} {total:6.2f}s calls " + " ".join(f"{c:.2f}" for c in calls), flush=True)
for name in variants:
    med = statistics.median(totals[name])
    cols = list(zip(*percall[name], strict=True))
    print(f"{name:8s} median {med:.2f}s; per call (median) " + " ".join(f"{statistics.median(c):.2f}" for c in cols))
print("max abs diff between outputs:", (outs["package"] - outs["effdiff"]).abs().max().item())
