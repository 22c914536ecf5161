"""``laptop``: run a pipeline with the depth-pruned (layers removed), distilled denoiser that
``effdiff compress --method laptop`` made."""

from __future__ import annotations

from effdiff.methods.prune.compressed import PATH, CompressedMethod
from effdiff.registry import Paper, Param

LAPTOP = Paper("LAPTOP-Diff: Layer Pruning and Normalized Distillation for Compressing Diffusion Models",
               "2404.11098", "arXiv 2024")


class LaptopDiff(CompressedMethod):
    """A denoiser with layers removed, chosen one-shot by how little each changes the output, then finetuned with
    normalized feature distillation from the original.

    Paper: LAPTOP-Diff: Layer Pruning and Normalized Distillation for Compressing Diffusion Models (Zhang et al.,
    arXiv 2404.11098).
    """

    name = "laptop"
    paper = LAPTOP
    summary = "layer-pruned + distilled denoiser (LAPTOP-Diff): ResNets/attention or DiT blocks removed"
    importances = ("output", "random")
    params = {"macs": Param(float, 0.7, 0.01, 0.99, help="which compressed model: its MACs as a fraction"),
              "importance": Param(str, "output", choices=importances,
                                  help="output (LAPTOP-Diff's one-shot output loss) or random (the naive baseline)"),
              "path": PATH}
