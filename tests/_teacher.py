"""A tiny random teacher with the bundled models' interface (32×32 pixels, MiniLM caption states), so that
distillation runs its whole code path in seconds."""

from __future__ import annotations

import torch
from diffusers import PixArtTransformer2DModel, UNet2DConditionModel

from effdiff.zoo.architectures import default_scheduler
from effdiff.zoo.pipelines import TinyDiTPipeline, TinySDPipeline
from effdiff.zoo.text import TEXT_DIM, load_text_encoder


def tiny_teacher(kind: str = "sd", seed: int = 0):
    torch.manual_seed(seed)
    if kind == "sd":
        unet = UNet2DConditionModel(
            sample_size=32, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=TEXT_DIM, attention_head_dim=2, norm_num_groups=4)
        pipe = TinySDPipeline(unet.eval(), default_scheduler(), *load_text_encoder())
    elif kind == "sd-stages":  # SD 1.5's layout in miniature: two pairs per stage, an innermost DownBlock2D
        unet = UNet2DConditionModel(
            sample_size=32, in_channels=1, out_channels=1, block_out_channels=(8, 16, 16), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TEXT_DIM, attention_head_dim=2, norm_num_groups=4)
        pipe = TinySDPipeline(unet.eval(), default_scheduler(), *load_text_encoder())
    else:
        transformer = PixArtTransformer2DModel(
            sample_size=32, patch_size=4, in_channels=1, out_channels=1, num_layers=2, num_attention_heads=2,
            attention_head_dim=8, cross_attention_dim=16, caption_channels=TEXT_DIM, norm_type="ada_norm_single",
            use_additional_conditions=False, interpolation_scale=1)
        pipe = TinyDiTPipeline(transformer.eval(), default_scheduler(), *load_text_encoder())
    pipe.denoiser.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
