"""A published LCM-LoRA on SD 1.5: effdiff's ``lcm:path=`` beside diffusers' ``load_lora_weights`` (+ ``fuse_lora``).

What a user of the real LCM-LoRA (latent-consistency/lcm-lora-sdv1-5: rank 64 on every attention, feed-forward,
ResNet and resampler layer of the U-Net, kohya's layout) pays for it on each side, on the SD 1.5 U-Net twin
(random weights: speed and weight agreement only, no quality) with a LoRA of the same shape and layout:

- seconds to apply it (read + merge; diffusers: load, then fuse) and to take it off again (effdiff ``remove()``;
  diffusers ``unfuse_lora`` + ``unload_lora_weights``), and whether the original weights come back bit for bit;
- one U-Net call (batch 2, the guided call) with the LoRA merged by effdiff, loaded unfused by diffusers (PEFT
  layers add two matmuls per layer), and fused by diffusers, against the bare U-Net, alternating in one process;
- the largest difference between effdiff's merged weights and diffusers' fused ones;
- end to end: ``lcm:steps=4`` (no CFG pass) against DDIM 50 + CFG 7.5, same prompt embeddings and seed.

    HF_HUB_OFFLINE=1 python benchmarks/published_lora.py [--size 256] [--device cpu|cuda] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import effdiff
from effdiff.eval.cost import time_alternating, timed
from effdiff.host import cpu_description

RANK = 64
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
           "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


def kohya_lora(unet: torch.nn.Module, path: Path, rank: int = RANK) -> int:
    """A random LoRA on LCM-LoRA's layers, in kohya's layout (``lora_unet_<layer>.lora_down/lora_up/alpha``), as
    latent-consistency/lcm-lora-sdv1-5 ships; returns its parameter count."""
    generator = torch.Generator().manual_seed(0)
    tensors, count = {}, 0
    for name, module in unet.named_modules():
        if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d) or not name.endswith(TARGETS):
            continue
        weight = module.weight
        down = torch.randn((rank, weight.shape[1], *weight.shape[2:]), generator=generator) / weight[0].numel() ** 0.5
        up = torch.randn((weight.shape[0], rank, *(1,) * (weight.dim() - 2)), generator=generator) * 0.01
        stem = "lora_unet_" + name.replace(".", "_")
        tensors |= {f"{stem}.lora_down.weight": down.half(), f"{stem}.lora_up.weight": up.half(),
                    f"{stem}.alpha": torch.tensor(float(rank // 2))}
        count += down.numel() + up.numel()
    save_file(tensors, str(path))
    return count


def per_call(unet, call: dict, reps: int, enter, leave) -> dict[str, float]:
    """One U-Net call bare and with a LoRA in place, alternating (``enter``/``leave`` switch, untimed)."""
    with torch.no_grad():
        bare, variant = time_alternating(lambda: unet(**call), lambda: unet(**call), reps=reps, warmup=1,
                                         enter_variant=enter, exit_variant=leave)
    return {"bare_s": round(bare.median, 3), "with_lora_s": round(variant.median, 3),
            "speed_vs_bare": round(bare.median / variant.median, 3),
            "spread": round(max(bare.spread, variant.spread), 3)}


def weights(unet) -> dict[str, torch.Tensor]:
    """The U-Net's tensors under their plain names (PEFT's ``base_layer`` folded away), LoRA factors left out."""
    return {k.replace(".base_layer", ""): v.detach() for k, v in unet.state_dict().items() if "lora_" not in k}


def checksums(unet) -> dict[str, str]:
    """A digest of every tensor's bytes: bit-exactness checked without holding a second 3.4 GB copy (which made
    this 2-core VM reclaim memory and the timings noisy)."""
    return {k: hashlib.blake2b(v.cpu().contiguous().numpy().tobytes(), digest_size=16).hexdigest()
            for k, v in weights(unet).items()}


def differing(now: dict[str, str], original: dict[str, str]) -> int:
    return sum(now[k] != original[k] for k in original)


def sd15_twin(description: str, reps: int, out: str) -> tuple[argparse.Namespace, Any, torch.dtype]:
    """The flags both SD 1.5 benchmarks take, and the SD 1.5 twin on the device they name (fp16 on a GPU)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", type=int, default=256, help="pixels per side (latents are size/8)")
    parser.add_argument("--reps", type=int, default=reps)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=out)
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(2)
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    pipe = effdiff.load("sd15-arch").to(args.device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return args, pipe, dtype


def main() -> None:
    args, pipe, dtype = sd15_twin(__doc__.splitlines()[0], 5, "benchmarks/results/published_lora.json")
    unet = pipe.unet
    folder = Path(tempfile.mkdtemp())
    lora_file = folder / "pytorch_lora_weights.safetensors"
    parameters = kohya_lora(unet, lora_file)
    latent = args.size // 8
    generator = torch.Generator().manual_seed(0)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator).to(args.device, dtype)
    call = {"sample": torch.randn(2, 4, latent, latent, generator=generator).to(args.device, dtype),
            "timestep": torch.tensor([500, 500], device=args.device), "encoder_hidden_states": text}
    original = checksums(unet)
    report = {"benchmark": "published_lora", "when": time.strftime("%Y-%m-%d %H:%M"), "machine": cpu_description(),
              "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": str(dtype),
              "size": args.size, "lora": {"layout": "kohya", "rank": RANK, "parameters": parameters,
                                          "megabytes_fp16": round(lora_file.stat().st_size / 2**20, 1)}}

    recipe = f"lcm:steps=4,path={lora_file}"
    apply_s = timed(lambda: effdiff.accelerate(pipe, recipe))
    merged_weights = weights(unet)
    remove_s = timed(pipe.effdiff.remove)
    report["effdiff"] = {"apply_s": round(apply_s, 2), "remove_s": round(remove_s, 3),
                         "tensors_differing_after_remove": differing(checksums(unet), original)}
    load_s = timed(lambda: pipe.load_lora_weights(str(folder)))
    fuse_s = timed(pipe.fuse_lora)
    report["merged_vs_fused_largest_difference"] = max(
        (value.float() - merged_weights[key].float()).abs().max().item() for key, value in weights(unet).items())
    del merged_weights
    unfuse_s = timed(lambda: (pipe.unfuse_lora(), pipe.unload_lora_weights()))
    report["diffusers"] = {"load_s": round(load_s, 2), "fuse_s": round(fuse_s, 2),
                           "unfuse_unload_s": round(unfuse_s, 2),
                           "tensors_differing_after_unfuse": differing(checksums(unet), original)}

    report["per_call"] = {
        "effdiff merged": per_call(unet, call, args.reps, lambda: effdiff.accelerate(pipe, recipe),
                                   lambda: pipe.effdiff.remove()),
        "diffusers unfused": per_call(unet, call, args.reps, lambda: pipe.load_lora_weights(str(folder)),
                                      pipe.unload_lora_weights),
        "diffusers fused": per_call(unet, call, args.reps,
                                    lambda: (pipe.load_lora_weights(str(folder)), pipe.fuse_lora()),
                                    lambda: (pipe.unfuse_lora(), pipe.unload_lora_weights()))}

    def generate(**kwargs):
        return pipe(prompt_embeds=text[:1], negative_prompt_embeds=text[1:], height=args.size, width=args.size,
                    generator=torch.Generator().manual_seed(1), output_type="pt", **kwargs).images

    with torch.no_grad():
        baseline_s = timed(lambda: generate(num_inference_steps=50, guidance_scale=7.5))
        effdiff.accelerate(pipe, recipe)
        lcm_s = timed(generate)
        pipe.effdiff.remove()
    report["end_to_end"] = {"baseline": "DDIM 50 + CFG 7.5", "baseline_s": round(baseline_s, 2),
                            "lcm_steps4_s": round(lcm_s, 2), "speedup": round(baseline_s / lcm_s, 2),
                            "denoiser_calls": {"baseline": 100, "lcm": 4}}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
