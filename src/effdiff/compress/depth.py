"""Depth pruning of a transformer denoiser by a learned layer mask (TinyFusion), or by a seeded random choice.

Fang et al. (TinyFusion, arXiv 2412.01199) observe that which blocks to drop is best judged by how well the pruned
model *recovers* after finetuning, not by the loss right after pruning. They learn it: the blocks are cut into
local groups of M consecutive ones, each group keeps N, and each group holds a categorical distribution over its
C(M, N) keep-patterns. Every training sample draws one pattern per group with the Gumbel-softmax trick (hard
one-hot forward, soft gradients backward; temperature annealed from 4 to 0.1, logits scaled ×100 as their code
does); a dropped block passes its input through (``x + m·(f(x) − x)``). The mask's logits and a LoRA on every
linear layer (their "recoverability": the model is finetuned a little while the mask is learned) train together
on the plain denoising loss (LoRA: effdiff's own, ``distill/lora.py``, rank 8, α 16, on every layer wider than
the rank); the LoRA is thrown away afterwards and each group keeps its most likely pattern.
``random``: each group keeps a seeded random N — the naive baseline the learned mask must beat.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable

import torch
from torch import nn

from effdiff.patches import PatchLog

DEPTH_IMPORTANCES = ("learned", "random")


def parse_pattern(pattern: str, blocks: int) -> tuple[int, int]:
    """``"N:M"`` -> (N, M): keep N of every M consecutive blocks; M must divide the block count."""
    try:
        keep, group = (int(part) for part in pattern.split(":"))
    except ValueError:
        raise ValueError(f"the pattern is N:M (keep N of every M blocks), got {pattern!r}") from None
    if not 0 < keep < group or blocks % group:
        raise ValueError(f"pattern {pattern!r}: needs 0 < N < M and M dividing the {blocks} blocks")
    return keep, group


class GroupMasks(nn.Module):
    """One categorical distribution over keep-patterns per group of blocks, sampled per example."""

    def __init__(self, blocks: int, keep: int, group: int) -> None:
        super().__init__()
        patterns = [[1.0 if i in chosen else 0.0 for i in range(group)]
                    for chosen in itertools.combinations(range(group), keep)]
        self.register_buffer("patterns", torch.tensor(patterns))
        self.logits = nn.Parameter(torch.full((blocks // group, len(patterns)), 0.02))

    def sample(self, batch: int, tau: float, generator: torch.Generator, scaling: float = 100.0) -> torch.Tensor:
        """(batch, blocks) hard 0/1 masks whose gradient is the Gumbel-softmax's (straight-through)."""
        uniform = torch.rand((batch, *self.logits.shape), generator=generator).clamp(1e-9, 1 - 1e-9)
        gumbel = -torch.log(-torch.log(uniform)).to(self.logits.device)
        soft = torch.softmax((self.logits * scaling + gumbel) / tau, dim=-1)
        hard = nn.functional.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
        choice = hard + soft - soft.detach()
        return (choice @ self.patterns).reshape(batch, -1)

    def kept(self) -> list[int]:
        """The blocks each group's most likely pattern keeps."""
        group = self.patterns.shape[1]
        best = self.patterns[self.logits.argmax(-1)]
        return [g * group + i for g, row in enumerate(best.tolist()) for i, on in enumerate(row) if on]


def random_kept(blocks: int, keep: int, group: int, seed: int) -> list[int]:
    """Each group keeps a seeded random ``keep`` of its blocks."""
    rng = random.Random(seed)
    return sorted(g * group + i for g in range(blocks // group) for i in rng.sample(range(group), keep))


def masked_blocks(patches: PatchLog, blocks: nn.ModuleList, current: list[torch.Tensor | None]) -> None:
    """Make each block compute ``x + m·(f(x) − x)`` with m its column of ``current[0]`` (one value per example)."""
    for index, block in enumerate(blocks):
        def make(inner: Callable, index: int = index) -> Callable:
            def forward(hidden: torch.Tensor, *args, **kwargs):
                out = inner(hidden, *args, **kwargs)
                mask = current[0][:, index].to(out.dtype).view(-1, *[1] * (out.dim() - 1))
                return hidden + mask * (out - hidden)
            return forward
        patches.forward(block, make)


def learn_kept_blocks(model: nn.Module, blocks_name: str, pattern: str, loss_of: Callable[[nn.Module], torch.Tensor],
                      iterations: int, batch: int, generator: torch.Generator, lora_rank: int = 8,
                      lora_lr: float = 1e-4, mask_lr: float = 1e-3) -> tuple[list[int], dict]:
    """TinyFusion's mask learning on a copy of ``model`` (``model`` itself is not changed): returns the kept block
    indices and {pattern, iterations, final logits, kept}. ``loss_of(masked model)`` is the denoising loss on a
    fresh batch of ``batch`` examples."""
    import copy

    from effdiff.distill.lora import attach

    work = copy.deepcopy(model).requires_grad_(False)
    blocks: nn.ModuleList = work.get_submodule(blocks_name)
    keep, group = parse_pattern(pattern, len(blocks))
    lora = list(attach(work, lora_rank, seed=0, alpha=2 * lora_rank).parameters())
    masks = GroupMasks(len(blocks), keep, group).to(next(work.parameters()).device)
    current: list[torch.Tensor | None] = [None]
    log = PatchLog()
    masked_blocks(log, blocks, current)
    opt = torch.optim.AdamW([{"params": lora, "lr": lora_lr}, {"params": [masks.logits], "lr": mask_lr}],
                            weight_decay=0.0)
    work.train()
    for step in range(iterations):
        tau = 4.0 + (0.1 - 4.0) * step / max(1, iterations - 1)
        current[0] = masks.sample(batch, tau, generator)
        loss = loss_of(work)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*lora, masks.logits], 1.0)
        opt.step()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"mask learning diverged at iteration {step}")
    log.restore()
    kept = masks.kept()
    return kept, {"pattern": pattern, "mask_iterations": iterations,
                  "mask_probabilities": torch.softmax(masks.logits.detach() * 100.0, -1).tolist(), "kept": kept}
