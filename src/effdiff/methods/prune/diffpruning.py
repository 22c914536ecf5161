"""``diffpruning``: run a pipeline with the structurally pruned (channels and heads), finetuned denoiser that
``effdiff compress --method diffpruning`` made."""

from __future__ import annotations

from effdiff.methods.prune.compressed import PATH, CompressedMethod
from effdiff.registry import Paper, Param

DIFF_PRUNING = Paper("Structural Pruning for Diffusion Models", "2305.10924", "NeurIPS 2023")
DEPGRAPH = Paper("DepGraph: Towards Any Structural Pruning", "2301.12900", "CVPR 2023")


class DiffPruning(CompressedMethod):
    """A denoiser pruned to a MAC budget by Diff-Pruning's Taylor importance, then finetuned.

    Paper: Structural Pruning for Diffusion Models (Fang et al., arXiv 2305.10924); the dependency graph that
    removes coupled channels together: DepGraph (Fang et al., arXiv 2301.12900, the torch-pruning library).
    """

    name = "diffpruning"
    paper = DIFF_PRUNING
    also = (DEPGRAPH,)
    summary = "structurally pruned + finetuned denoiser (Diff-Pruning): fewer channels and heads, dense and smaller"
    importances = ("taylor", "magnitude")
    params = {"macs": Param(float, 0.5, 0.01, 0.99, help="which compressed model: its MACs as a fraction"),
              "importance": Param(str, "taylor", choices=importances,
                                  help="taylor (Diff-Pruning) or magnitude (the naive baseline)"),
              "allocation": Param(str, "uniform", choices=("uniform", "global"),
                                  help="which compressed model: the same share from every layer (the paper's) or a "
                                       "global ranking"),
              "path": PATH}

    def folder_name(self) -> str:
        from effdiff.compress.trainer import compressed_folder

        return compressed_folder(self.name, self.values["macs"], self.values["importance"],
                                 allocation=self.values["allocation"])

    def command_flags(self) -> str:
        allocation = self.values["allocation"]
        return super().command_flags() + ("" if allocation == "uniform" else f" --allocation {allocation}")
