"""What ``tinyvae`` buys on SD 1.5 once the denoiser is cheap: the VAE decode alone, and a whole 4-step image.

On the SD 1.5 twin (random weights: speed only, no quality — the tiny autoencoder is TAESD's architecture with
random weights, as the published madebyollin/taesd would be after download), at ``--size`` px:

- one VAE decode (batch 1): the pipeline's ``AutoencoderKL`` against ``AutoencoderTiny`` swapped in by
  ``tinyvae:path=``, alternating in one process (switch untimed);
- a whole image with a published-layout LCM-LoRA (``benchmarks/published_lora.py``'s random rank-64 file):
  ``lcm:steps=4`` against ``lcm:steps=4+tinyvae``, rounds alternating (each recipe applied and removed around its
  timed call), and the baseline DDIM 50 + CFG 7.5 once in the same process.

    HF_HUB_OFFLINE=1 python benchmarks/tiny_vae.py [--size 256] [--reps 3] [--device cpu|cuda] [--out FILE]
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import AutoencoderTiny
from published_lora import kohya_lora, sd15_twin

import effdiff
from effdiff.eval.cost import time_alternating, timed
from effdiff.host import cpu_description


def main() -> None:
    args, pipe, dtype = sd15_twin(__doc__.splitlines()[0], 3, "benchmarks/results/tiny_vae.json")
    folder = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    AutoencoderTiny().save_pretrained(str(folder / "taesd"))  # TAESD's architecture, random weights
    kohya_lora(pipe.unet, folder / "lcm.safetensors")
    tiny = f"tinyvae:path={folder / 'taesd'}"
    lcm = f"lcm:steps=4,path={folder / 'lcm.safetensors'}"
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 4, args.size // 8, args.size // 8, generator=generator).to(args.device, dtype)
    text = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=generator).to(args.device, dtype)

    with torch.no_grad():
        vae, small = time_alternating(lambda: pipe.vae.decode(latent), lambda: pipe.vae.decode(latent),
                                      reps=args.reps, warmup=1, enter_variant=lambda: effdiff.accelerate(pipe, tiny),
                                      exit_variant=lambda: pipe.effdiff.remove())

    def image(**kwargs) -> float:
        with torch.no_grad():
            return timed(lambda: pipe(prompt_embeds=text[:1], negative_prompt_embeds=text[1:], height=args.size,
                                        width=args.size, generator=torch.Generator().manual_seed(1),
                                        output_type="pt", **kwargs))

    def under(recipe: str) -> float:
        effdiff.accelerate(pipe, recipe)
        try:
            return image()
        finally:
            pipe.effdiff.remove()

    under(lcm), under(f"{lcm}+{tiny}")  # warm-up
    rounds = [(under(lcm), under(f"{lcm}+{tiny}")) for _ in range(args.reps)]
    baseline = image(num_inference_steps=50, guidance_scale=7.5)
    lcm_s = statistics.median(r[0] for r in rounds)
    both_s = statistics.median(r[1] for r in rounds)
    report = {
        "benchmark": "tiny_vae", "when": time.strftime("%Y-%m-%d %H:%M"), "machine": cpu_description(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "threads": torch.get_num_threads(),
        "torch": torch.__version__, "dtype": str(dtype), "size": args.size, "label": "speed-only (random weights)",
        "decoder_parameters": {"AutoencoderKL": sum(p.numel() for p in pipe.vae.decoder.parameters()),
                               "AutoencoderTiny": sum(p.numel() for p in AutoencoderTiny().decoder.parameters())},
        "decode": {"vae_s": round(vae.median, 3), "tinyvae_s": round(small.median, 3),
                   "speedup": round(vae.median / small.median, 1),
                   "spread": round(max(vae.spread, small.spread), 3)},
        "image": {"baseline DDIM 50 + CFG 7.5": round(baseline, 2), "lcm:steps=4": round(lcm_s, 2),
                  "lcm:steps=4+tinyvae": round(both_s, 2), "rounds": [[round(a, 2), round(b, 2)] for a, b in rounds],
                  "lcm_speedup": round(baseline / lcm_s, 2), "lcm_tinyvae_speedup": round(baseline / both_s, 2)},
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
