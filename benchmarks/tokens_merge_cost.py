"""What merging itself costs: effdiff's ``tome`` maps vs tomesd's, on the same tokens, outside any model.

One merged sub-layer's bookkeeping at ratio 0.5 with a 2x2 stride, as ToMe for SD does it at SD 1.5's
downsample-1 blocks (320 channels, a CFG batch of 2): build the match from the block's tokens, merge the
layer's input, unmerge its output. Sizes 256 / 384 / 512 px (1,024 / 2,304 / 4,096 tokens). Both sides run
in turn each round, so drift hits both; the median of ``rounds`` after a warm-up.

    PYTHONPATH=src python benchmarks/tokens_merge_cost.py [rounds, default 20]
"""

import statistics
import sys
import time

import tomesd.merge
import torch

from effdiff.methods.tokens.maps import bipartite, partition

torch.set_num_threads(2)
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 20


def effdiff_merge(x: torch.Tensor, side: int) -> torch.Tensor:
    dst, src = partition(side, side, 2, 2, torch.Generator().manual_seed(0), x.device)
    tmap = bipartite(x, dst, src, x.shape[1] // 2)
    return tmap.expand(tmap.reduce(x))


def tomesd_merge(x: torch.Tensor, side: int) -> torch.Tensor:
    merge, unmerge = tomesd.merge.bipartite_soft_matching_random2d(x, side, side, 2, 2, x.shape[1] // 2,
                                                                   generator=torch.Generator().manual_seed(0))
    return unmerge(merge(x))


for px in (256, 384, 512):
    side = px // 8
    x = torch.randn(2, side * side, 320, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {"effdiff": [], "tomesd": []}
    with torch.no_grad():
        for rnd in range(rounds + 1):
            for name, fn in (("effdiff", effdiff_merge), ("tomesd", tomesd_merge)):
                start = time.perf_counter()
                fn(x, side)
                if rnd:  # round 0 warms up
                    times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    spread = ", ".join(f"{n} {min(t) * 1e3:.1f}-{max(t) * 1e3:.1f}" for n, t in times.items())
    print(f"{px} px, {side * side} tokens: effdiff {med['effdiff']:.1f} ms, tomesd {med['tomesd']:.1f} ms "
          f"(tomesd / effdiff {med['tomesd'] / med['effdiff']:.2f}); rounds {spread} ms", flush=True)
