"""Sequence parallelism at real scale: the random-weight twin of PixArt-α's transformer (28 blocks, 16 heads), one
guided denoiser call (batch 2) split over the ranks by ``seqparallel`` (Ulysses, ring) and by DistriFusion's
synchronous exchange, against the same call in one process — speed only (random weights), plus how far each
rank's output is from the one-process output. ``--model flux``: FLUX.1-dev's transformer at its full width (24
heads × 128, 512 text tokens, guidance embedded, batch 1) cut to ``--flux-blocks`` double and twice as many single
blocks (of its 19 + 38) so that two ranks fit this machine's memory; a call's cost is per block, so the ratio holds.

Timing is interleaved on the same machine: each repetition times the split call on every rank (one thread each),
then rank 0 alone times the whole call with every rank's threads (the others wait at a barrier) — the honest
alternative on one host. On a 2-core CPU this says whether the split's communication and per-call overheads eat
its halved work; across GPUs the cost model (``effdiff plan``) estimates it.

    HF_HUB_OFFLINE=1 torchrun --standalone --nproc_per_node=2 benchmarks/parallel_twins.py [--px 256] [--reps 3]
        [--recipes seqparallel seqparallel:ring=2 distrifusion:exchange=sync] [--model pixart|flux] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel

import effdiff
from effdiff.distributed import init_from_env
from effdiff.host import cpu_description, simd
from effdiff.zoo.twins import FLUX_DEV, PIXART_XL2

TINY = {"pixart": {**PIXART_XL2, "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8,
                   "cross_attention_dim": 16, "caption_channels": 32},
        "flux": {**FLUX_DEV, "num_layers": 1, "num_single_layers": 2, "num_attention_heads": 2,
                 "attention_head_dim": 16, "joint_attention_dim": 32, "pooled_projection_dim": 16,
                 "axes_dims_rope": (4, 6, 6)}}  # --tiny: the same script end to end in seconds
FLUX_TEXT = 512  # FLUX.1-dev's T5 sequence
MODELS = {"pixart": "pixart-alpha-arch transformer (random weights)",
          "flux": "flux-dev-arch transformer, {blocks} double + {blocks}×2 single blocks (random weights)"}


def model_and_inputs(name: str, px: int, tiny: bool, flux_blocks: int) -> tuple[torch.nn.Module, dict, int]:
    """The transformer, one call's arguments at ``px`` pixels (latent px / 8), seeded alike on every rank, and its
    image tokens. PixArt: a guided call (batch 2, 120 caption tokens). FLUX: one call (guidance embedded), the
    latent packed 2 × 2 into tokens, ids for the rotary tables."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    side = px // 8
    if name == "pixart":
        config = TINY["pixart"] if tiny else PIXART_XL2
        model = PixArtTransformer2DModel(**config)
        kwargs = {"hidden_states": torch.randn(2, config["in_channels"], side, side, generator=generator),
                  "encoder_hidden_states": torch.randn(2, 120, config["caption_channels"], generator=generator),
                  "timestep": torch.tensor([500, 500]), "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
                  "return_dict": False}
        return model.eval().requires_grad_(False), kwargs, (side // config["patch_size"]) ** 2
    config = TINY["flux"] if tiny else {**FLUX_DEV, "num_layers": flux_blocks, "num_single_layers": 2 * flux_blocks}
    model = FluxTransformer2DModel(**config)
    grid = side // 2
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    text = 8 if tiny else FLUX_TEXT
    kwargs = {"hidden_states": torch.randn(1, grid * grid, config["in_channels"], generator=generator),
              "encoder_hidden_states": torch.randn(1, text, config["joint_attention_dim"], generator=generator),
              "pooled_projections": torch.randn(1, config["pooled_projection_dim"], generator=generator),
              "timestep": torch.tensor([0.5]), "guidance": torch.tensor([3.5]),
              "img_ids": torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float(),
              "txt_ids": torch.zeros(text, 3), "return_dict": False}
    return model.eval().requires_grad_(False), kwargs, grid * grid


class Holder:
    """The transformer held the way a pipeline holds it (``accelerate`` patches a pipeline's denoiser); the
    benchmark calls the transformer itself."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.transformer = transformer

    def __call__(self) -> None:
        raise TypeError("call holder.transformer")


def timed(call) -> float:
    dist.barrier()
    start = time.perf_counter()
    call()
    dist.barrier()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--px", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--recipes", nargs="+", default=["seqparallel", "seqparallel:ring=2",
                                                         "distrifusion:exchange=sync"])
    parser.add_argument("--model", choices=("pixart", "flux"), default="pixart")
    parser.add_argument("--flux-blocks", type=int, default=1, help="FLUX double blocks (single blocks: twice)")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", help="default: benchmarks/results/parallel_twins_<px>.json")
    args = parser.parse_args()
    rank, world = init_from_env()
    torch.set_num_threads(1)
    model, kwargs, tokens = model_and_inputs(args.model, args.px, args.tiny, args.flux_blocks)
    holder = Holder(model)
    with torch.no_grad():
        model(**kwargs)  # warm-up
        whole = model(**kwargs)[0]
    rows = []
    for recipe in args.recipes:
        effdiff.accelerate(holder, recipe)
        split_s, single_s = [], []
        with torch.no_grad():
            split = model(**kwargs)[0]  # warm-up, and the output compared
            for _ in range(args.reps):
                split_s.append(timed(lambda: model(**kwargs)))
                holder.effdiff.remove()
                if rank == 0:
                    torch.set_num_threads(world)
                single_s.append(timed(lambda: model(**kwargs) if rank == 0 else None))
                torch.set_num_threads(1)
                effdiff.accelerate(holder, recipe)
        with torch.no_grad():
            model(**kwargs)  # one more call, counted: the bytes one split call sends
        sent = getattr(holder.effdiff.methods[0], "sent_bytes", None)
        holder.effdiff.remove()
        gap = float((split - whole).abs().max())
        row = {"recipe": recipe, "split_s": statistics.median(split_s), "one_process_s": statistics.median(single_s),
               "speedup": statistics.median(single_s) / statistics.median(split_s), "max_abs_diff": gap,
               "relative_diff": gap / float(whole.abs().max()),
               "sent_mb_per_call": None if sent is None else sent / 1e6}
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
    if rank == 0:
        result = {"command": "HF_HUB_OFFLINE=1 torchrun --standalone --nproc_per_node=2 benchmarks/parallel_twins.py "
                             f"--px {args.px} --reps {args.reps} --recipes {' '.join(args.recipes)}"
                             + (f" --model flux --flux-blocks {args.flux_blocks}" if args.model == "flux" else "")
                             + (f" --out {args.out}" if args.out else "")
                             + (" --tiny" if args.tiny else ""),
                  "model": f"tiny {args.model}" if args.tiny else MODELS[args.model].format(blocks=args.flux_blocks),
                  "tokens": tokens, "text_tokens": kwargs["encoder_hidden_states"].shape[1],
                  "batch": kwargs["hidden_states"].shape[0], "ranks": world,
                  "machine": cpu_description(),
                  "cpu_flags": simd(),
                  "rows": rows}
        if not args.tiny:
            name = "parallel_twins" if args.model == "pixart" else "parallel_twins_flux"
            out = Path(args.out or f"benchmarks/results/{name}_{args.px}.json")
            out.write_text(json.dumps(result, indent=1))
        else:
            print(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
