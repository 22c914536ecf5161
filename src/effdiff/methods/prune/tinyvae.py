"""``tinyvae``: decode (and encode) with a tiny distilled autoencoder instead of the pipeline's VAE.

Why: the VAE is outside every denoiser method's reach, and once the denoiser is cheap it is a large share of an
image's time — at 256 px SD 1.5's decode costs about one guided U-Net step on a CPU, a fifth of a whole 4-step
``lcm`` image (``benchmarks/tiny_vae.py``). A TAESD-style autoencoder
(diffusers' ``AutoencoderTiny``: 1.2 M decoder parameters against SD's 49 M) is distilled to reproduce the VAE's
decode from the same latents, so it drops into the pipeline: its ``scaling_factor`` 1 and zero shift make the
pipeline hand it the latents as the denoiser left them, which is what it was trained on.

The weights come from ``path=``: a diffusers ``AutoencoderTiny`` folder (``config.json`` and weights) — the
published madebyollin/taesd (SD 1.x/2.x), taesdxl (SDXL) or taef1 (FLUX.1), downloaded beforehand (nothing is
fetched). The swap goes through the undo log, so ``remove()`` puts the very VAE object back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from effdiff.registry import Method, Paper, Param, RecipeError

SNAPFUSION = Paper("SnapFusion: Text-to-Image Diffusion Model on Mobile Devices within Two Seconds", "2306.00980",
                   "NeurIPS 2023")


class TinyVAE(Method):
    """A distilled small image decoder in place of the VAE's (SnapFusion's efficient decoder; TAESD's layout).

    Paper: SnapFusion (Li et al., arXiv 2306.00980), section 4: a channel-reduced decoder distilled from SD's on
    the denoiser's own latents. The published TAESD/TAEF1 weights (madebyollin) follow the same idea.
    """

    name = "tinyvae"
    family = "prune"
    paper = SNAPFUSION
    summary = "tiny distilled autoencoder (diffusers AutoencoderTiny: TAESD/TAEF1) in place of the VAE"
    params = {"path": Param(str, "", help="a diffusers AutoencoderTiny folder (e.g. madebyollin/taesd, downloaded)")}
    exclusive = ("vae",)
    before = ("quant", "compile")

    def unavailable(self, pipe: Any) -> str | None:
        if getattr(pipe, "vae", None) is None:
            return f"{self.name}: {type(pipe).__name__} has no VAE (a pixel-space model decodes nothing)"
        if not self.values["path"]:
            return (f"{self.name}: pass path= a diffusers AutoencoderTiny folder for this VAE's latents "
                    "(madebyollin/taesd for SD 1.x/2.x, taesdxl for SDXL, taef1 for FLUX.1), downloaded beforehand")
        return None

    def apply(self, pipe: Any, ctx: Any) -> None:
        from diffusers import AutoencoderTiny

        refusal = self.unavailable(pipe)
        if refusal:
            raise RecipeError(refusal)
        folder = Path(self.values["path"]).expanduser()
        if not (folder / "config.json").is_file():
            raise RecipeError(f"{self.name}: {folder} has no config.json (a diffusers AutoencoderTiny folder)")
        try:
            tiny = AutoencoderTiny.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, TypeError) as exc:
            raise RecipeError(f"{self.name}: {folder} is not an AutoencoderTiny folder ({exc})") from None
        vae = pipe.vae
        ours, theirs = tiny.config.latent_channels, vae.config.latent_channels
        if ours != theirs:
            raise RecipeError(f"{self.name}: {folder} decodes {ours}-channel latents, this pipeline's VAE "
                              f"{theirs}-channel ones (taesd/taesdxl: 4, taef1: 16)")
        tiny = tiny.to(vae.device, vae.dtype).eval().requires_grad_(False)
        self.patches.attr(pipe, "vae", tiny)
        self.source = str(folder)

    def describe(self) -> str:
        return super().describe() + f" from {getattr(self, 'source', '')}"
