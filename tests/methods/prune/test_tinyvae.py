"""``tinyvae``: a diffusers AutoencoderTiny folder replaces the pipeline's VAE (same image shape, other pixels),
``remove()`` puts the very VAE object back, and a missing folder, a latent-channel mismatch and a VAE-less
pipeline are refused with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _stock import build, generate
from diffusers import AutoencoderTiny

import effdiff
from effdiff.registry import RecipeError


def _tiny_autoencoder(folder: Path, latent_channels: int = 4) -> Path:
    """A random TAESD-layout autoencoder, narrow so it builds fast, with two blocks each way: it upsamples by 2,
    as the stock test pipeline's VAE does. Saved as diffusers saves one."""
    torch.manual_seed(3)
    tiny = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                           num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=latent_channels)
    tiny.save_pretrained(str(folder))
    return folder


def test_the_tiny_autoencoder_decodes_and_remove_puts_the_vae_back(tmp_path):
    pipe = build("sd")
    vae = pipe.vae
    before = generate("sd", pipe, steps=2)
    effdiff.accelerate(pipe, f"tinyvae:path={_tiny_autoencoder(tmp_path)}")
    assert isinstance(pipe.vae, AutoencoderTiny)
    swapped = generate("sd", pipe, steps=2)
    assert swapped.shape == before.shape and not torch.equal(swapped, before)
    pipe.effdiff.remove()
    assert pipe.vae is vae
    assert torch.equal(generate("sd", pipe, steps=2), before)


def test_it_stacks_with_a_denoiser_method(tmp_path):
    pipe = build("sd")
    effdiff.accelerate(pipe, f"ddim:steps=2+tinyvae:path={_tiny_autoencoder(tmp_path)}")
    assert isinstance(pipe.vae, AutoencoderTiny) and generate("sd", pipe, steps=None).shape[-1] == 16


def test_refusals_name_what_is_missing(tmp_path, tiny_sd):
    pipe = build("sd")
    with pytest.raises(RecipeError, match="madebyollin/taesd"):
        effdiff.accelerate(pipe, "tinyvae")
    with pytest.raises(RecipeError, match="no config.json"):
        effdiff.accelerate(pipe, f"tinyvae:path={tmp_path}")
    with pytest.raises(RecipeError, match="16-channel latents"):
        effdiff.accelerate(pipe, f"tinyvae:path={_tiny_autoencoder(tmp_path / 'f1', latent_channels=16)}")
    assert not isinstance(pipe.vae, AutoencoderTiny)
    with pytest.raises(RecipeError, match="has no VAE"):
        effdiff.accelerate(tiny_sd, f"tinyvae:path={_tiny_autoencoder(tmp_path / 'sd')}")
