"""The layers of a denoiser split into row patches, each rank holding one: what each needs from the others.

A convolution reads rows above and below its patch (the halo), a GroupNorm normalises by the whole image's
statistics, a self-attention attends to every patch's keys and values. Each wrapper takes those from an
``Exchange`` (fresh or a step stale, as ``mode()`` says: ``sync``, ``stale``) or, in ``none`` mode, does without
them — the naive patch split DistriFusion compares against (zero halos, per-patch statistics, per-patch attention).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from effdiff.methods.parallel.cfg import gathered
from effdiff.methods.parallel.exchange import Exchange
from effdiff.registry import RecipeError

Forward = Callable[..., Any]
Mode = Callable[[], str]


def halo_rows(conv: nn.Conv2d) -> tuple[int, int]:
    """(rows above, rows below) a patch that ``conv`` reads for its patch's output rows: its padding above, and
    below what the last output's window reaches past the patch (none for a stride-2, 3×3, padding-1 conv)."""
    kernel, pad, stride = conv.kernel_size[0], conv.padding[0], conv.stride[0]  # type: ignore[index]
    return pad, max(0, kernel - pad - stride)


def unsplittable_conv(conv: nn.Module) -> str | None:
    """Why ``conv`` cannot run on a row patch with borrowed halo rows; None when it can."""
    if type(conv).forward is not nn.Conv2d.forward:
        return f"{type(conv).__name__} has its own forward (LoRA, quantized); apply the parallel method first"
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros" or conv.dilation != (1, 1):
        return "only zero-padded, undilated convolutions take halo rows"
    return None


def conv_with_halo(conv: nn.Conv2d, exchange: Exchange, mode: Mode,
                   whole_input: Callable[[], torch.Tensor] | None = None) -> Callable[[Forward], Forward]:
    """``conv`` on this rank's rows with the halo rows around them; the height padding becomes real rows
    (zeros only at the image's top and bottom). ``whole_input``: the layer reads the input every rank holds whole,
    so its halo is exact and needs no exchange."""
    above, below = halo_rows(conv)

    def make(inner: Forward) -> Forward:
        def forward(x: torch.Tensor) -> torch.Tensor:
            rank, world, height = exchange.rank, exchange.world, x.shape[-2]
            if height < max(above, below):
                raise RecipeError(f"a patch of {height} rows is thinner than a convolution's halo; use fewer ranks "
                                  "or a larger image")
            zeros = x.new_zeros(*x.shape[:-2], max(above, below), x.shape[-1])
            if whole_input is not None:
                whole, start = whole_input(), rank * height
                top = whole[..., max(0, start - above):start, :]
                bottom = whole[..., start + height:start + height + below, :]
                top = torch.cat([zeros[..., :above - top.shape[-2], :], top], dim=-2)
                bottom = torch.cat([bottom, zeros[..., :below - bottom.shape[-2], :]], dim=-2)
            elif (current := mode()) == "none":
                top, bottom = zeros[..., :above, :], zeros[..., :below, :]
            else:
                edges = torch.cat([x[..., :below, :], x[..., height - above:, :]], dim=-2)
                parts = exchange.parts(edges, current == "sync")
                top = parts[rank - 1][..., below:, :] if rank > 0 else zeros[..., :above, :]
                bottom = parts[rank + 1][..., :below, :] if rank < world - 1 else zeros[..., :below, :]
            rows = torch.cat([top, x, bottom], dim=-2)
            return F.conv2d(rows, conv.weight, conv.bias, conv.stride, (0, conv.padding[1]),  # type: ignore[index]
                            conv.dilation, conv.groups)

        return forward

    return make


def group_norm_over_patches(norm: nn.GroupNorm, exchange: Exchange, mode: Mode) -> Callable[[Forward], Forward]:
    """``norm`` with every patch's group mean and mean square averaged (patches are equal in size, so that is
    the whole image's); stale steps use the others' statistics from the previous step with this patch's fresh —
    DistriFusion's corrected asynchronous GroupNorm. Statistics in float32; a variance the mix of fresh and stale
    makes negative is clamped at zero."""

    def make(inner: Forward) -> Forward:
        def forward(x: torch.Tensor) -> torch.Tensor:
            grouped = x.float().reshape(x.shape[0], norm.num_groups, -1)
            stats = torch.stack([grouped.mean(-1), grouped.square().mean(-1)], dim=-1)
            if (current := mode()) != "none":
                stats = torch.stack(exchange.parts(stats, current == "sync")).mean(0)
            mean, square = stats[..., :1], stats[..., 1:]
            normed = (grouped - mean) * torch.rsqrt((square - mean.square()).clamp_min(0) + norm.eps)
            out = normed.reshape(x.shape).to(x.dtype)
            if norm.affine:
                shape = (1, -1) + (1,) * (x.dim() - 2)
                out = out * norm.weight.reshape(shape) + norm.bias.reshape(shape)
            return out

        return forward

    return make


def whole_sequence(exchange: Exchange, mode: Mode) -> Callable[[Forward], Forward]:
    """A self-attention's key or value projection returning every patch's tokens (this patch's fresh), so the
    patch's queries attend to the whole image — the key/value exchange of DistriFusion's attention."""

    def make(inner: Forward) -> Forward:
        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            out = inner(x, *args, **kwargs)
            if (current := mode()) == "none":
                return out
            return torch.cat(exchange.parts(out, current == "sync"), dim=1)

        return forward

    return make


def own_tokens(name: str, rank: int, world: int) -> Callable[[Forward], Forward]:
    """A DiT's token-making layer (``PatchLayout.entry``) returning this rank's contiguous share of the sequence."""

    def make(inner: Forward) -> Forward:
        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            tokens = inner(*args, **kwargs)
            count = tokens.shape[1]
            if count % world:
                raise RecipeError(f"{name}: {count} tokens do not split between {world} ranks")
            share = count // world
            return tokens[:, rank * share:(rank + 1) * share]

        return forward

    return make


def all_tokens(world: int, group: Any = None) -> Callable[[Forward], Forward]:
    """A DiT's last block (``PatchLayout.exit``) returning every rank's tokens (of ``group``; None: all) in rank
    order, the whole sequence."""

    def make(inner: Forward) -> Forward:
        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            return gathered(inner(*args, **kwargs), world, dim=1, group=group)

        return forward

    return make
