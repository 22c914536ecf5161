"""Random-weight twins of real architectures, for speed at true scale. They are **speed-only**:
their images are noise and they never report quality.

Configs follow the published SD 1.5 U-Net / VAE, PixArt-XL-2 and DiT-XL/2 checkpoints. The text
encoders are small random stand-ins with the real output width (their cost is once per call, not per
step), and the tokenizer is the bundled MiniLM one because CLIP/T5 vocabularies cannot be downloaded.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

TWINS = ("sd15-arch", "pixart-alpha-arch", "dit-xl2-arch")
LATENT = 32  # 256 px images through an 8× VAE

SD_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "sample_size": 256,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
}
SD15_UNET = {
    "sample_size": LATENT, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}
PIXART_XL2 = {
    "sample_size": LATENT, "num_layers": 28, "num_attention_heads": 16, "attention_head_dim": 72,
    "in_channels": 4, "out_channels": 8, "patch_size": 2, "cross_attention_dim": 1152, "caption_channels": 4096,
    "norm_type": "ada_norm_single", "use_additional_conditions": False, "interpolation_scale": 1,
}
DIT_XL2 = {
    "sample_size": LATENT, "num_layers": 28, "num_attention_heads": 16, "attention_head_dim": 72,
    "in_channels": 4, "out_channels": 8, "patch_size": 2, "num_embeds_ada_norm": 1000,
}
# Denoiser-only configs: what ``effdiff plan`` traces (no pipeline is built for them here).
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280), "cross_attention_dim": 2048, "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10), "use_linear_projection": True,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
FLUX_DEV = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
            "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
            "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}
VAE_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
                "steps_offset": 1}


def _tokenizer(max_length: int):
    from transformers import AutoTokenizer

    from effdiff.zoo.text import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path(), model_max_length=max_length)


def _clip_text(width: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(vocab_size=30522, hidden_size=width, intermediate_size=width * 4,
                                        num_hidden_layers=2, num_attention_heads=8, max_position_embeddings=77))


def _t5_text(width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=30522, d_model=width, d_ff=1024, d_kv=64, num_layers=1,
                                   num_heads=8))


def build_twin(name: str, seed: int = 0) -> DiffusionPipeline:
    """A pipeline of the named architecture with seeded random weights (speed-only)."""
    torch.manual_seed(seed)
    scheduler = DDIMScheduler(**VAE_SCHEDULE)
    if name == "sd15-arch":
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(**SD_VAE), text_encoder=_clip_text(768), tokenizer=_tokenizer(77),
            unet=UNet2DConditionModel(**SD15_UNET), scheduler=scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )
    elif name == "pixart-alpha-arch":
        pipe = PixArtAlphaPipeline(
            tokenizer=_tokenizer(120), text_encoder=_t5_text(4096), vae=AutoencoderKL(**SD_VAE),
            transformer=PixArtTransformer2DModel(**PIXART_XL2), scheduler=scheduler,
        )
    elif name == "dit-xl2-arch":
        pipe = DiTPipeline(transformer=DiTTransformer2DModel(**DIT_XL2), vae=AutoencoderKL(**SD_VAE),
                           scheduler=scheduler, id2label={i: f"class {i}" for i in range(1000)})
    else:
        raise ValueError(f"unknown twin {name!r}; twins: {', '.join(TWINS)}")
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    pipe.effdiff_model_name = name
    pipe.effdiff_speed_only = True
    return pipe
