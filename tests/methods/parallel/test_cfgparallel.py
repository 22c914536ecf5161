"""``cfgparallel`` on two gloo ranks started here: each rank computes its half of the guided batch, and the
images are bit for bit those of one process computing the two halves one after the other, and within float
rounding of one process computing them as one batch (alone and under a fixed-schedule cache) — the CPU's matmul
kernels round a row differently at batch 1 and batch 2 (measured: up to 5e-7 per denoiser call), so exact
equality with the batched run is not reachable by splitting. A batch the ranks cannot share, a feature-driven
cache beside it and a missing process group are refused with the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_tiny_dit, make_tiny_sd, sample

import effdiff
from effdiff import RecipeError


def halves_in_turn(inner, args: tuple, kwargs: dict):
    """The denoiser on the first then the second half of its batch, in one process (what two ranks compute)."""
    from effdiff.methods.parallel.cfg import batch_of, rows

    batch = batch_of(args, kwargs)
    outs = [inner(*rows(args, batch, i * batch // 2, (i + 1) * batch // 2),
                  **rows(kwargs, batch, i * batch // 2, (i + 1) * batch // 2)) for i in range(2)]
    first = [o if isinstance(o, torch.Tensor) else o[0] if isinstance(o, tuple) else o.sample for o in outs]
    joined = torch.cat(first)
    if isinstance(outs[0], torch.Tensor):
        return joined
    if isinstance(outs[0], tuple):
        return (joined, *outs[0][1:])
    outs[0].sample = joined
    return outs[0]


def _rank(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    results = {}
    try:
        for kind, make in (("sd", make_tiny_sd), ("dit", make_tiny_dit)):
            pipe = make()
            for recipe in ("", "deepcache:interval=2" if kind == "sd" else "fora:interval=2"):
                if recipe:
                    effdiff.accelerate(pipe, recipe)
                batched = sample(pipe, steps=3)
                denoiser = pipe.unet if kind == "sd" else pipe.transformer
                inner = denoiser.forward
                denoiser.forward = lambda *a, inner=inner, **k: halves_in_turn(inner, a, k)
                single = sample(pipe, steps=3)
                del denoiser.forward
                if recipe:
                    pipe.effdiff.remove()
                effdiff.accelerate(pipe, "cfgparallel" + (f"+{recipe}" if recipe else ""))
                split = sample(pipe, steps=3)
                calls = pipe.effdiff.methods[0].split_calls
                try:
                    sample(pipe, steps=2, guidance_scale=1.0)  # no CFG: a batch of 1 for 2 ranks
                    refused = ""
                except RecipeError as exc:
                    refused = str(exc)
                pipe.effdiff.remove()
                results[f"{kind} {recipe}"] = {"equal": bool(torch.equal(single, split)), "calls": calls,
                                               "batched_diff": float((batched - split).abs().max()),
                                               "refused": refused, "checksum": float(split.double().sum())}
        try:
            effdiff.accelerate(make_tiny_sd(), "cfgparallel+fbcache")
            results["fbcache"] = ""
        except RecipeError as exc:
            results["fbcache"] = str(exc)
    finally:
        dist.destroy_process_group()
    Path(out.format(rank=rank)).write_text(json.dumps(results))


def test_two_ranks_give_the_single_process_images_bit_for_bit(tmp_path):
    out = str(tmp_path / "rank{rank}.json")
    mp.spawn(_rank, args=(str(tmp_path / "store"), out), nprocs=2, join=True)
    ranks = [json.loads(Path(out.format(rank=r)).read_text()) for r in range(2)]
    for case, row in ranks[0].items():
        if case == "fbcache":
            assert "fbcache decides from the features" in row
            continue
        # a cache holds one call per step, so the two halves in turn are a reference only without one
        assert row["equal"] or case.split(" ")[1], case
        assert row["batched_diff"] < 1e-4, case
        assert row["calls"] == 3, case  # one split call per guided step
        assert "a denoiser batch of 1 does not divide between 2 ranks" in row["refused"]
        assert ranks[1][case]["checksum"] == row["checksum"]  # both ranks hold the whole images


def test_without_a_process_group_it_is_refused():
    with pytest.raises(RecipeError, match="no process group with 2 or more ranks"):
        effdiff.accelerate(make_tiny_sd(), "cfgparallel")


def test_generate_with_two_ranks_writes_the_single_process_grid(tmp_path, capsys):
    """``effdiff generate --nproc 2`` relaunches itself under torchrun; rank 0 writes the grid (8-bit pixels equal
    the one-process grid's), and a recipe without a parallel method is refused before anything starts."""
    import os
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from effdiff.cli import USAGE_ERROR, main

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["generate", "--model", "tiny-sd", "--prompt", "a handwritten seven", "-n", "2", "--steps", "3"]
    assert main([*args, "--out", str(tmp_path / "one.png")]) == 0  # in-process: only the relaunch needs a process
    subprocess.run([sys.executable, "-m", "effdiff.cli", *args, "--recipe", "cfgparallel", "--nproc", "2", "--out",
                    str(tmp_path / "two.png")], check=True, env=env, capture_output=True)
    one, two = (np.asarray(Image.open(tmp_path / name)).astype(int) for name in ("one.png", "two.png"))
    assert one.shape == two.shape and np.abs(one - two).max() <= 1
    assert main([*args, "--recipe", "deepcache", "--nproc", "2", "--out", str(tmp_path / "x.png")]) == USAGE_ERROR
    assert "needs a parallel method in the recipe" in capsys.readouterr().err
