"""``ditprune``: run a pipeline with the depth-pruned (and, to reach the budget, width-pruned), distilled DiT that
``effdiff compress --method ditprune`` made."""

from __future__ import annotations

from effdiff.methods.prune.compressed import PATH, CompressedMethod
from effdiff.registry import Paper, Param

TINYFUSION = Paper("TinyFusion: Diffusion Transformers Learned Shallow", "2412.01199", "CVPR 2025")


class DitPrune(CompressedMethod):
    """A DiT keeping N of every M blocks, chosen by a mask learned together with a LoRA (so the choice favours
    blocks whose loss the rest can recover), heads and feed-forward width pruned further if the budget asks, then
    distilled from the original with masked feature distillation.

    Paper: TinyFusion: Diffusion Transformers Learned Shallow (Fang et al., arXiv 2412.01199).
    """

    name = "ditprune"
    backbones = frozenset({"dit"})
    paper = TINYFUSION
    summary = "depth-pruned + distilled DiT (TinyFusion): blocks dropped by a learned N:M mask"
    importances = ("learned", "random")
    params = {"macs": Param(float, 0.5, 0.01, 0.99, help="which compressed model: its MACs as a fraction"),
              "importance": Param(str, "learned", choices=importances,
                                  help="learned (TinyFusion's mask) or random (the naive baseline)"),
              "path": PATH}
