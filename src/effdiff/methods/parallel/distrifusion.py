"""``distrifusion``: one image's patches on several ranks, with the other patches' activations a step stale."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from effdiff.methods.parallel.base import ParallelMethod
from effdiff.methods.parallel.cfg import DISTRIFUSION, gathered, with_sample
from effdiff.methods.parallel.exchange import Exchange
from effdiff.methods.parallel.patch_layers import (
    all_tokens,
    conv_with_halo,
    group_norm_over_patches,
    own_tokens,
    unsplittable_conv,
    whole_sequence,
)
from effdiff.registry import Param, RecipeError


class DistriFusion(ParallelMethod):
    """Displaced patch parallelism: the image is split into one patch per rank (rows of a U-Net's latent, a
    DiT's token sequence) and each rank runs the whole denoiser on its patch. Where a layer needs the rest of
    the image — a convolution's halo rows, GroupNorm's statistics, self-attention's keys and values — it takes
    them from the other ranks: synchronously for the first ``warmup`` + 1 steps, then **a step stale**,
    sent asynchronously so the communication hides behind the computation; inputs of neighbouring steps are
    close, so stale activations cost little quality (the paper's "displaced" patches). Each step ends with the
    patches' outputs gathered, so every rank runs the same scheduler step on the whole latent.

    ``exchange=sync`` communicates fresh activations every step (exact up to float rounding, no overlap);
    ``exchange=none`` is the naive patch split the paper compares against (no interaction: seams). Feature-driven
    caches and token methods would decide per patch, so they are refused beside it; solvers, fixed-schedule
    caches (DeepCache — a combination the paper's authors name) and compressed or quantized models stack.

    Paper: Li et al., "DistriFusion: Distributed Parallel Inference for High-Resolution Diffusion Models",
    arXiv 2402.19481 (CVPR 2024).
    """

    name = "distrifusion"
    paper = DISTRIFUSION
    summary = "one image's patches on several ranks; other patches' activations one step stale, sent asynchronously"
    streams = frozenset({"single"})
    params = {
        "warmup": Param(int, 4, 0, 1000, help="synchronous steps after the first, before activations go stale"),
        "exchange": Param(str, "stale", choices=("stale", "sync", "none"),
                          help="stale: DistriFusion; sync: fresh every step; none: the naive patch split"),
    }
    REFUSED = ("fbcache", "teacache", "l2c", "toca")

    def apply(self, pipe: Any, ctx: Any) -> None:
        self.exchanges: list[Exchange] = []
        self._unregister: Any = lambda: None
        self.join_ranks()
        layout = self.adapter.patch_layout()
        if layout is None:
            raise RecipeError(f"{self.name}: {type(self.adapter.model).__name__} has no patch split in effdiff "
                              "(U-Nets split by rows, PixArt/DiT by tokens); use cfgparallel")
        beside = [m.name for m in self.recipe if m.name in self.REFUSED or m.family == "tokens"]
        if beside:
            raise RecipeError(f"{self.name}: {', '.join(beside)} decides from the features or changes the tokens, "
                              "which each rank sees only its patch of; use a fixed-schedule cache (deepcache, fora, "
                              "taylorseer)")
        self.ctx, self.layout = ctx, layout
        self.whole: torch.Tensor | None = None
        if layout.split == "rows":
            self._split_rows(layout)
        else:
            self.patches.forward(layout.entry, own_tokens(self.name, self.rank, self.world))
            self.patches.forward(layout.exit, all_tokens(self.world, self.group))
        for name, attn in self.adapter.self_attentions():
            if getattr(attn, "fused_projections", False):
                raise RecipeError(f"{self.name}: {name} has fused q/k/v projections; unfuse them first")
            for projection in (attn.to_k, attn.to_v):
                self.patches.forward(projection, whole_sequence(self._exchange(), self.mode))
        self._unregister = ctx.on_reset(self._reset)

    def mode(self) -> str:
        """How this step's layers exchange: the parameter, with ``stale`` synchronous through the warm-up."""
        if self["exchange"] == "stale" and self.ctx.step_index <= self["warmup"]:
            return "sync"
        return self["exchange"]

    def _exchange(self) -> Exchange:
        exchange = Exchange(self.rank, self.world, self.group)
        self.exchanges.append(exchange)
        return exchange

    @property
    def sent_bytes(self) -> int:
        """Bytes this rank has contributed to its layers' exchanges (measured communication)."""
        return sum(e.sent for e in self.exchanges)

    def _split_rows(self, layout: Any) -> None:
        model = self.adapter.model
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d) and module.kernel_size[0] > 1:
                reason = unsplittable_conv(module)
                if reason:
                    raise RecipeError(f"{self.name}: {name}: {reason}")
                source = (lambda: self.whole) if module is layout.entry else None
                self.patches.forward(module, conv_with_halo(module, self._exchange(), self.mode, source))
            elif isinstance(module, nn.GroupNorm):
                if type(module).forward is not nn.GroupNorm.forward:
                    raise RecipeError(f"{self.name}: {name}: {type(module).__name__} has its own forward")
                self.patches.forward(module, group_norm_over_patches(module, self._exchange(), self.mode))
        self.patches.forward(model, self._rows_of_own_patch)

    def _rows_of_own_patch(self, inner: Any) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if any(kwargs.get(k) is not None for k in ("down_block_additional_residuals",
                                                        "mid_block_additional_residual")):
                raise RecipeError(f"{self.name}: ControlNet residuals are not split into patches")
            sample = kwargs["sample"] if "sample" in kwargs else args[0]
            height, multiple = sample.shape[-2], self.layout.row_multiple * self.world
            if height % multiple:
                raise RecipeError(f"{self.name}: a latent of {height} rows does not split into {self.world} patches "
                                  f"whose heights are multiples of {self.layout.row_multiple} (the U-Net's "
                                  f"downsampling); use a height that is a multiple of {multiple}")
            share = height // self.world
            self.whole = sample
            own = sample[..., self.rank * share:(self.rank + 1) * share, :]
            if "sample" in kwargs:
                kwargs = {**kwargs, "sample": own}
            else:
                args = (own, *args[1:])
            try:
                out = inner(*args, **kwargs)
            finally:
                self.whole = None
            return with_sample(out, lambda part: gathered(part, self.world, dim=-2, group=self.group))

        return forward

    def _reset(self) -> None:
        for exchange in self.exchanges:
            exchange.reset()

    def remove(self) -> None:
        self._unregister()
        self._reset()
