"""``bksdm``: run a pipeline with the block-removed, distilled U-Net that ``effdiff compress --method bksdm`` made."""

from __future__ import annotations

from effdiff.methods.prune.compressed import PATH, CompressedMethod
from effdiff.registry import Paper, Param

BK_SDM = Paper("BK-SDM: A Lightweight, Fast, and Cheap Version of Stable Diffusion", "2305.15798", "ECCV 2024")


class BkSdm(CompressedMethod):
    """A U-Net with whole blocks removed by BK-SDM's hand-made rule — half of each stage's ResNet/attention pairs
    (base), also the mid-block (small), also the innermost stage (tiny) — then distilled from the original on the
    denoising loss, its output and each stage's features.

    Paper: BK-SDM: A Lightweight, Fast, and Cheap Version of Stable Diffusion (Kim et al., arXiv 2305.15798).
    """

    name = "bksdm"
    backbones = frozenset({"unet"})
    paper = BK_SDM
    summary = "block-removed + distilled U-Net (BK-SDM base/small/tiny): pairs, mid-block, innermost stage removed"
    importances = ("handpicked",)
    params = {"variant": Param(str, "small", choices=("base", "small", "tiny"),
                               help="base: half the pairs; small: also the mid-block; tiny: also the innermost stage",
                               search=("base", "small", "tiny")),
              "path": PATH}

    def folder_name(self) -> str:
        return f"bksdm-{self.values['variant']}"

    def command_flags(self) -> str:
        return f" --variant {self.values['variant']}"
