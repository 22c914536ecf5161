"""Published LoRAs (diffusers/PEFT and kohya layouts) read as effdiff deltas, and merged by ``lcm:path=``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _stock import PROMPT, SIZE, build, generate
from safetensors.torch import save_file

import effdiff
from effdiff.distill.lora import LoRAError
from effdiff.distill.published import is_published, read_published

pytest.importorskip("peft", reason="diffusers' own LoRA loading (the parity reference) needs peft")

TARGETS = ["to_q", "to_out.0", "conv1", "proj_in", "time_emb_proj"]


def _peft_lora(folder: Path, rank: int = 4, alpha: int = 8) -> dict[str, torch.Tensor]:
    """A random PEFT LoRA on the stock SD U-Net (a build of its own: PEFT wraps the layers it targets), saved the
    way diffusers' training scripts save one. Returns its state dict (PEFT keys)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = build("sd")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights="gaussian")
    pipe.unet.add_adapter(config)
    torch.manual_seed(1)
    for name, parameter in pipe.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(pipe.unet).items()}
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=state,
                                              unet_lora_adapter_metadata=config.to_dict())
    return state


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}


def test_lcm_merges_a_diffusers_lora_as_diffusers_fuses_it_and_remove_restores_bits(tmp_path):
    pipe = build("sd")
    _peft_lora(tmp_path)
    original = _weights(pipe)
    reference = build("sd")
    reference.load_lora_weights(str(tmp_path))
    reference.fuse_lora()
    fused = {k.replace(".base_layer", ""): v for k, v in reference.unet.state_dict().items() if "lora_" not in k}

    effdiff.accelerate(pipe, f"lcm:path={tmp_path}")
    merged = _weights(pipe)
    changed = [k for k in merged if not torch.equal(merged[k], original[k])]
    assert changed and all(k.endswith("weight") for k in changed)
    for key, value in merged.items():
        torch.testing.assert_close(value, fused[key], rtol=1e-5, atol=1e-6)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    pipe.effdiff.remove()
    assert all(torch.equal(value, original[key]) for key, value in _weights(pipe).items())


def test_a_file_path_and_the_pipeline_output_follow_the_lora(tmp_path):
    pipe = build("sd")
    _peft_lora(tmp_path)
    before = generate("sd", pipe, steps=2)
    effdiff.accelerate(pipe, f"lcm:steps=2,path={tmp_path / 'pytorch_lora_weights.safetensors'}")
    with_lora = generate("sd", pipe, steps=2)
    pipe.effdiff.remove()
    assert with_lora.shape == before.shape and not torch.equal(with_lora, before)
    assert torch.equal(generate("sd", pipe, steps=2), before)


def test_kohya_layout_reads_with_its_alphas(tmp_path):
    pipe = build("sd")
    generator = torch.Generator().manual_seed(0)
    linear = ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", (8, 8))
    conv = ("down_blocks.0.resnets.0.conv1", (8, 8, 3, 3))
    tensors, expected = {}, {}
    for (layer, shape), alpha in ((linear, 2.0), (conv, 8.0)):
        rank = 4
        down = torch.randn((rank, shape[1], *shape[2:]), generator=generator)
        up = torch.randn((shape[0], rank, *(1,) * (len(shape) - 2)), generator=generator)
        stem = "lora_unet_" + layer.replace(".", "_")
        tensors |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up,
                    f"{stem}.alpha": torch.tensor(alpha)}
        expected[layer] = (down, up * alpha / rank)
    save_file(tensors, str(tmp_path / "lcm_lora.safetensors"))
    assert is_published(tmp_path) and is_published(tmp_path / "lcm_lora.safetensors")
    deltas = read_published(pipe, tmp_path, "unet")
    assert set(deltas) == set(expected)
    for layer, (down, up) in expected.items():
        torch.testing.assert_close(deltas[layer][0], down)
        torch.testing.assert_close(deltas[layer][1], up)


def test_peft_alpha_comes_from_the_metadata(tmp_path):
    pipe = build("sd")
    state = _peft_lora(tmp_path, rank=4, alpha=8)
    deltas = read_published(pipe, tmp_path, "unet")
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    torch.testing.assert_close(deltas[layer][1], state[f"{layer}.lora_B.weight"] * 2)


def test_text_encoder_entries_and_other_architectures_are_refused(tmp_path):
    pipe = build("sd")
    stem = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{stem}.lora_down.weight": torch.zeros(2, 16), f"{stem}.lora_up.weight": torch.zeros(16, 2),
               f"{stem}.alpha": torch.tensor(2.0)}, str(tmp_path / "te.safetensors"))
    with pytest.raises(LoRAError, match="text_encoder"):
        read_published(pipe, tmp_path / "te.safetensors", "unet")
    wrong = tmp_path / "wide"
    wrong.mkdir()
    layer = "lora_unet_down_blocks_0_resnets_0_conv1"
    save_file({f"{layer}.lora_down.weight": torch.zeros(2, 32, 3, 3),
               f"{layer}.lora_up.weight": torch.zeros(32, 2, 1, 1)}, str(wrong / "pytorch_lora_weights.safetensors"))
    before = _weights(pipe)
    with pytest.raises(effdiff.RecipeError, match="down_blocks.0.resnets.0.conv1"):
        effdiff.accelerate(pipe, f"lcm:path={wrong}")
    assert all(torch.equal(value, before[key]) for key, value in _weights(pipe).items())
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"


def test_dmd_samples_a_published_dmd2_lora_on_its_own_grid_without_cfg(tmp_path):
    """DMD2's 4-step LoRA: merged as lcm merges it, one call (no unconditional half) at each of 999, 749, 499,
    249, another step count refused, and ``remove()`` gives back the bits and the scheduler."""
    pipe = build("sd")
    _peft_lora(tmp_path)
    reference = build("sd")
    effdiff.accelerate(reference, f"lcm:path={tmp_path}")
    original = _weights(pipe)
    effdiff.accelerate(pipe, f"dmd:steps=4,path={tmp_path}")
    assert all(torch.equal(value, _weights(reference)[key]) for key, value in _weights(pipe).items())
    calls: list[tuple[int, int]] = []
    pipe.unet.register_forward_pre_hook(lambda _m, args, kwargs: calls.append((len(args[0]), int(args[1]))),
                                        with_kwargs=True)
    pipe(PROMPT, height=SIZE, width=SIZE, output_type="pt")  # the steps and guidance are the recipe's
    assert calls == [(1, 999), (1, 749), (1, 499), (1, 249)]
    with pytest.raises(effdiff.RecipeError, match="samples in 4 steps .* not 2"):
        generate("sd", pipe, steps=2)
    pipe.effdiff.remove()
    assert all(torch.equal(value, original[key]) for key, value in _weights(pipe).items())
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"


def test_only_the_methods_that_read_published_loras_take_one_and_the_refusal_names_them(tmp_path):
    pipe = build("sd")
    _peft_lora(tmp_path)
    with pytest.raises(effdiff.RecipeError, match=r"published LoRAs load with dmd or lcm \(form=lora\)"):
        effdiff.accelerate(pipe, f"progressive:path={tmp_path}")
    with pytest.raises(effdiff.RecipeError, match=r"published LoRAs load with dmd or lcm \(form=lora\)"):
        effdiff.accelerate(pipe, f"lcm:form=full,path={tmp_path}")


def test_effdiffs_own_student_files_are_not_taken_for_published_ones(tmp_path):
    from effdiff.distill.store import RECORD

    save_file({"layer.down": torch.zeros(2, 4), "layer.up": torch.zeros(4, 2)}, str(tmp_path / "lora.safetensors"))
    assert is_published(tmp_path) and is_published(tmp_path / "lora.safetensors")
    (tmp_path / RECORD).write_text("{}")
    assert not is_published(tmp_path) and not is_published(tmp_path / "lora.safetensors")
