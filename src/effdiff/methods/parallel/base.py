"""What every parallel method shares: its family and place in a recipe, and its group of the process group's ranks
(the whole world, or — stacked beside ``cfgparallel`` — one CFG branch's ranks)."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from effdiff.registry import Method, RecipeError

BRANCHES = 2  # a guided step's batch halves: [unconditional; conditional]


def branch_members(world: int, branches: int) -> list[list[int]]:
    """The global ranks of each CFG branch: consecutive blocks of ``world / branches`` (the patch or sequence
    split inside a branch is the one that communicates every layer, so its ranks are neighbours)."""
    size = world // branches
    return [list(range(b * size, (b + 1) * size)) for b in range(branches)]


def new_groups(member_lists: list[list[int]], rank: int) -> Any:
    """Create one process group per member list — every rank creates every group, in the same order, as
    ``new_group`` requires — and return the one ``rank`` belongs to (None if none)."""
    mine = None
    for members in member_lists:
        group = dist.new_group(members)
        mine = group if rank in members else mine
    return mine


class ParallelMethod(Method):
    """A method that splits the denoiser's work between the ranks of a ``torch.distributed`` process group. It
    owns the ranks alone (one parallel method a recipe) — except beside ``cfgparallel``, which takes the outer split
    (the CFG batch's halves on two branches of ranks) while the other method splits each branch's image between
    the branch's ranks (DistriFusion's and xDiT's layout). It comes after what changes the
    model (solvers, quantized, pruned or distilled weights) and before what works per layer call (caches, token
    methods); ``compile`` comes first, as it does before every method that decides per call in Python, and hands
    the core its compiler, which compiles per block beneath the parallel method's patches."""

    family = "parallel"
    exclusive = ("parallel",)
    after = ("solver", "quant", "prune", "distill")
    before = ("cache", "tokens")
    graph_safe = False
    splits_branches = False  # cfgparallel: the outer split, across the branches

    def join_ranks(self) -> None:
        """``self.rank`` / ``self.world``: this rank's index in its group and the group's size; ``self.members``
        the group's global ranks in order, ``self.group`` its process group (None: the default, whole world);
        ``self.branches`` every sibling group's members (for methods that make subgroups of their own). Refused
        without a process group of 2 or more ranks, or a world the branches do not split."""
        from effdiff.distributed import world

        rank, size = world()
        if size < 2:
            raise RecipeError(f"{self.name}: no process group with 2 or more ranks; run under torchrun or "
                              "`effdiff generate --nproc 2`")
        self.global_rank = rank
        self.rank, self.world, self.members, self.group = rank, size, list(range(size)), None
        self.branches = [self.members]
        beside = [m for m in self.recipe if m is not self and m.family == "parallel"]
        if not beside:
            return
        if size % BRANCHES or size < 2 * BRANCHES:
            raise RecipeError(f"{self.name}: beside {beside[0].name} the {size} ranks must split into {BRANCHES} CFG "
                              f"branches of 2 or more (a world of 4, 6, …)")
        inner = beside[0] if self.splits_branches else self
        branches = branch_members(size, BRANCHES)
        across = [[b[i] for b in branches] for i in range(size // BRANCHES)]  # one rank of each branch
        inside_group = new_groups(branches, rank)
        across_group = new_groups(across, rank)
        if self is inner:
            self.branches = branches
            self.members = next(b for b in branches if rank in b)
            self.group = inside_group
        else:
            self.members = next(a for a in across if rank in a)
            self.group = across_group
        self.rank, self.world = self.members.index(rank), len(self.members)
