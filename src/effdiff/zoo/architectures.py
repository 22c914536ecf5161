"""Configurations of the bundled generators, the feature classifier and the speed-only twins.

The twins copy the published configs of SD 1.5's U-Net, PixArt-XL-2 and DiT-XL/2 so that speed is
measured at true scale; their weights are seeded random, so they never report quality.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, PixArtTransformer2DModel, UNet2DConditionModel

from effdiff.zoo.data import IMAGE_SIZE
from effdiff.zoo.text import TEXT_DIM

TINY_SD_CONFIG: dict = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": TEXT_DIM,
    # diffusers' UNet2DConditionModel reads ``attention_head_dim`` as the number of heads.
    "attention_head_dim": 2,
    "norm_num_groups": 32,
    # The caption, attention-pooled, is also added to the time embedding: a global signal that makes
    # the digit identity easy to learn (cross-attention alone learned it slowly).
    "addition_embed_type": "text",
    "addition_embed_type_num_heads": 6,
}

TINY_DIT_CONFIG: dict = {
    "sample_size": IMAGE_SIZE,
    "patch_size": 2,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 8,
    "num_attention_heads": 3,
    "attention_head_dim": 32,
    "cross_attention_dim": 96,
    "caption_channels": TEXT_DIM,
    "norm_type": "ada_norm_single",
    "use_additional_conditions": False,
    "interpolation_scale": 1,
}

# Digit scenes (zoo/scenes.py): 64×64 RGB pixel space, ≈ 7.5 M parameters each. The U-Net's attention
# runs at 32×32 and 16×16, where one cell is 16×16 / 8×8 positions; the DiT's patch 4 gives 8×8 tokens a cell.
SCENE_SD_CONFIG: dict = {
    **TINY_SD_CONFIG,
    "sample_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (64, 128, 128),
    "attention_head_dim": 4,
}

SCENE_DIT_CONFIG: dict = {
    **TINY_DIT_CONFIG,
    "sample_size": 64,
    "patch_size": 4,
    "in_channels": 3,
    "out_channels": 3,
    "num_layers": 12,
    "num_attention_heads": 6,
    "attention_head_dim": 32,
    "cross_attention_dim": 192,
}

# Pixel-space cosine schedule with v-prediction: at high noise ε-prediction carries almost no signal
# about the digit (ε ≈ x_t), so conditioning was learned weakly; v makes the model predict the image.
# No ``clip_sample``: DDIM clips x0 but keeps the unclipped ε, and under CFG (guidance 4) that mismatch
# walks samples to the wrong digit (prompt accuracy 10 % with clipping, 100 % without, 20 steps).
NOISE_SCHEDULE: dict = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 0,
    "timestep_spacing": "leading",
}


def default_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**NOISE_SCHEDULE)


def build_tiny_sd() -> UNet2DConditionModel:
    return UNet2DConditionModel(**TINY_SD_CONFIG)


def build_tiny_dit() -> PixArtTransformer2DModel:
    return PixArtTransformer2DModel(**TINY_DIT_CONFIG)


def build_scene_sd() -> UNet2DConditionModel:
    return UNet2DConditionModel(**SCENE_SD_CONFIG)


def build_scene_dit() -> PixArtTransformer2DModel:
    return PixArtTransformer2DModel(**SCENE_DIT_CONFIG)


class DigitClassifier(torch.nn.Module):
    """Small CNN: its penultimate 128-d layer is the FID/KID feature space, its logits judge prompts."""

    feature_dim = 128

    def __init__(self) -> None:
        super().__init__()
        conv = torch.nn.Conv2d
        self.body = torch.nn.Sequential(
            conv(1, 32, 3, padding=1), torch.nn.GroupNorm(8, 32), torch.nn.SiLU(),
            conv(32, 32, 3, padding=1), torch.nn.GroupNorm(8, 32), torch.nn.SiLU(), torch.nn.MaxPool2d(2),
            conv(32, 64, 3, padding=1), torch.nn.GroupNorm(8, 64), torch.nn.SiLU(),
            conv(64, 64, 3, padding=1), torch.nn.GroupNorm(8, 64), torch.nn.SiLU(), torch.nn.MaxPool2d(2),
            conv(64, 128, 3, padding=1), torch.nn.GroupNorm(8, 128), torch.nn.SiLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
            torch.nn.Linear(128, self.feature_dim), torch.nn.SiLU(),
        )
        self.head = torch.nn.Linear(self.feature_dim, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate activations of images in [-1, 1], shape (N, 1, 32, 32)."""
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))
