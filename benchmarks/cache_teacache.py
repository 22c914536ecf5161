"""Speed-up and PSNR of calibrated TeaCache vs the baseline: 50 DDIM steps, guidance 4, 2 prompts (batch 1 each).

Run `effdiff calibrate --model M --method teacache --target 'psnr>=30'` first; plain `teacache` then loads it.

    PYTHONPATH=src HF_HUB_OFFLINE=1 python benchmarks/cache_teacache.py tiny-dit tiny-sd
"""

import sys

import torch

import effdiff
from effdiff.eval.cost import time_alternating
from effdiff.eval.fidelity import psnr

PROMPTS = ["a handwritten three", "a handwritten seven"]  # the calibrate prompts (eval_prompt 3, 7)
TEST = ["a handwritten one", "a handwritten eight"]  # held-out prompts


def run(pipe, prompts):
    out = []
    for i, p in enumerate(prompts):
        g = torch.Generator().manual_seed(i)
        out.append(pipe(p, num_inference_steps=50, guidance_scale=4.0, generator=g, output_type="pt").images)
    return torch.cat(out)


def measure(model: str) -> None:
    pipe = effdiff.load(model)
    pipe.set_progress_bar_config(disable=True)
    for name, prompts in (("calib prompts", PROMPTS), ("held-out prompts", TEST)):
        base = run(pipe, prompts)
        effdiff.accelerate(pipe, "teacache")
        m = pipe.effdiff.methods[0]
        var = run(pipe, prompts)
        desc, stats = m.describe(), (m.stats.full, m.stats.cached)
        pipe.effdiff.remove()
        print(f"{model} {name}: PSNR {psnr(var, base):.2f} dB; last call full/cached {stats}; {desc}")
    tb, tv = time_alternating(lambda: run(pipe, TEST), lambda: run(pipe, TEST), reps=3,
                              enter_variant=lambda: effdiff.accelerate(pipe, "teacache"),
                              exit_variant=lambda: pipe.effdiff.remove())
    print(f"{model}: baseline {tb.median:.3f}s (times {[round(t, 3) for t in tb.times]}), teacache {tv.median:.3f}s "
          f"(times {[round(t, 3) for t in tv.times]}), speed-up {tb.median / tv.median:.2f}x")


for name in sys.argv[1:]:
    measure(name)
