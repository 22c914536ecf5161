"""Speed-only twins at true scale.

Building a twin with real (random) weights takes 3–10 s per twin on this CPU (0.7–1 B parameters to
initialise), and even materialising one with constant weights for a 1-step 64-px call took 4–13 s on the
shared 2-core machine, so no twin generates here. They are built on the ``meta`` device instead: every
module, config and parameter shape is real, no memory is filled, and the wiring (tokenizer → text
encoder → denoiser → VAE) is checked by a meta-device forward at the true 256-px scale.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

from effdiff.zoo.twins import TWINS, build_twin

PIPELINE = {"sd15-arch": StableDiffusionPipeline, "pixart-alpha-arch": PixArtAlphaPipeline, "dit-xl2-arch": DiTPipeline}


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def meta_twins():
    with torch.device("meta"):
        return {name: build_twin(name) for name in TWINS}


@pytest.mark.parametrize("name", TWINS)
def test_twin_is_marked_speed_only(meta_twins, name):
    pipe = meta_twins[name]
    assert type(pipe) is PIPELINE[name]
    assert pipe.effdiff_speed_only is True and pipe.effdiff_model_name == name
    assert isinstance(pipe.vae, AutoencoderKL) and 2 ** (len(pipe.vae.config.block_out_channels) - 1) == 8
    assert isinstance(pipe.scheduler, DDIMScheduler)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            assert not module.training and not any(p.requires_grad for p in module.parameters())


def test_sd15_twin_has_the_published_size(meta_twins):
    pipe = meta_twins["sd15-arch"]
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert params(pipe.unet) == 859_520_964  # SD 1.5 U-Net
    assert params(pipe.vae) == 83_653_863  # SD VAE
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 768
    assert pipe.tokenizer.model_max_length <= pipe.text_encoder.config.max_position_embeddings


def test_pixart_twin_has_the_published_size(meta_twins):
    pipe = meta_twins["pixart-alpha-arch"]
    assert isinstance(pipe.transformer, PixArtTransformer2DModel)
    assert abs(params(pipe.transformer) - 611e6) / 611e6 < 0.01  # PixArt-α XL/2: 0.6 B
    assert pipe.transformer.config.caption_channels == pipe.text_encoder.config.d_model == 4096


def test_dit_twin_has_the_xl2_shape(meta_twins):
    transformer = meta_twins["dit-xl2-arch"].transformer
    assert isinstance(transformer, DiTTransformer2DModel)
    config = transformer.config
    width = config.num_attention_heads * config.attention_head_dim
    assert (config.num_layers, width, config.patch_size, config.num_embeds_ada_norm) == (28, 1152, 2, 1000)
    # 675 M in the paper, which shares one timestep/class embedder; diffusers' layout keeps one in each block
    embedders = [params(block.norm1.emb) for block in transformer.transformer_blocks]
    assert abs(params(transformer) - sum(embedders) + embedders[0] - 675e6) / 675e6 < 0.005


def test_unknown_twin():
    with pytest.raises(ValueError, match="sd15-arch"):
        build_twin("sd21-arch")


@torch.no_grad()
def test_wiring_at_true_scale_on_meta(meta_twins):
    """Tokenizer → text encoder → denoiser → VAE fit together at 256 px (shapes only, no arithmetic)."""
    sd = meta_twins["sd15-arch"]
    ids = sd.tokenizer(["a cat"], padding="max_length", max_length=sd.tokenizer.model_max_length,
                       truncation=True, return_tensors="pt").input_ids
    with torch.device("meta"):
        text = sd.text_encoder(ids.to("meta"))[0]
        assert text.shape == (1, 77, 768)
        eps = sd.unet(torch.empty(2, 4, 32, 32), torch.tensor([10]), encoder_hidden_states=text.expand(2, -1, -1))
        assert eps.sample.shape == (2, 4, 32, 32)
        assert sd.vae.decode(eps.sample[:1]).sample.shape == (1, 3, 256, 256)

        pixart = meta_twins["pixart-alpha-arch"]
        ids = pixart.tokenizer(["a cat"], padding="max_length", max_length=120, truncation=True,
                               return_tensors="pt").input_ids
        text = pixart.text_encoder(ids.to("meta"))[0]  # no mask: T5's mask check calls .item()
        assert text.shape == (1, 120, 4096)
        out = pixart.transformer(torch.empty(1, 4, 32, 32), encoder_hidden_states=text, timestep=torch.tensor([10]),
                                 added_cond_kwargs={"resolution": None, "aspect_ratio": None})
        assert out.sample.shape == (1, 8, 32, 32)  # ε and the learned variance

        dit = meta_twins["dit-xl2-arch"]
        out = dit.transformer(torch.empty(1, 4, 32, 32), timestep=torch.tensor([10]), class_labels=torch.tensor([3]))
        assert out.sample.shape == (1, 8, 32, 32)
