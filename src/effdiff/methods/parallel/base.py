"""What every parallel method shares: its family and place in a recipe, and joining the process group's ranks."""

from __future__ import annotations

from effdiff.registry import Method, RecipeError


class ParallelMethod(Method):
    """A method that splits the denoiser's work between the ranks of a ``torch.distributed`` process group. It
    owns the ranks alone (one parallel method a recipe), comes after what changes the model (solvers, quantized,
    pruned or distilled weights) and before what works per layer call (caches, token methods, compile), and decides
    per call in Python, so a compiled denoiser is compiled per block beneath it."""

    family = "parallel"
    exclusive = ("parallel",)
    after = ("solver", "quant", "prune", "distill")
    before = ("cache", "tokens", "compile")
    graph_safe = False

    def join_ranks(self) -> None:
        """``self.rank`` and ``self.world`` from the process group; refused without one of 2 or more ranks."""
        from effdiff.distributed import world

        self.rank, self.world = world()
        if self.world < 2:
            raise RecipeError(f"{self.name}: no process group with 2 or more ranks; run under torchrun or "
                              "`effdiff generate --nproc 2`")
