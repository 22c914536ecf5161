"""Text-to-digit pipelines for the bundled pixel-space models.

They follow diffusers' text-to-image call signature (``prompt``, ``negative_prompt``,
``num_inference_steps``, ``guidance_scale``, ``generator``, ``output_type``,
``callback_on_step_end``) and add SD-img2img's ``image`` / ``strength``. The stock
``StableDiffusionPipeline`` needs a VAE and a CLIP tokenizer; these 32×32 models work in pixel space
with a MiniLM encoder, so they subclass ``DiffusionPipeline`` and keep the signature.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from effdiff.zoo.text import encode_captions


class _DigitPipeline(DiffusionPipeline):
    """Shared sampling loop; subclasses name the denoiser and how it is called."""

    denoiser_name: str = ""
    model_cpu_offload_seq = "text_encoder->denoiser"

    def __init__(self) -> None:
        super().__init__()
        self._caption_cache: dict[str, torch.Tensor] = {}

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self, self.denoiser_name)

    def effdiff_prompts(self, purpose: str, n: int) -> list[str]:
        """What methods calibrate on and evaluate with (``effdiff.calling.conditions_for``), so they need not
        import the zoo: "eval" is the evaluation prompt of digits 0..9 in turn; "calibration" uses the other
        caption templates, never the evaluation one."""
        from effdiff.zoo.data import NUM_CLASSES, captions_for, eval_prompt

        if purpose == "eval":
            return [eval_prompt(d % NUM_CLASSES) for d in range(n)]
        return [captions_for(i % NUM_CLASSES)[1 + (i // NUM_CLASSES) % 7] for i in range(n)]

    def effdiff_calibration(self, method: str) -> dict[str, Any] | None:
        """The calibration shipped with this bundled model for ``method`` (TeaCache's fitted polynomial and
        threshold), so a method finds it without importing the zoo; None where nothing was shipped. The method
        still checks the record's weight fingerprint: retrained weights do not inherit it."""
        from effdiff.zoo.load import WEIGHTS

        name = str(getattr(self, "effdiff_model_name", "") or "")
        path = WEIGHTS / name / "calibration" / f"{method}.json"
        return json.loads(path.read_text()) if name and path.is_file() else None

    def _call_denoiser(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Caption token states; each distinct caption is encoded once per pipeline and cached."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._caption_cache]
        if missing:
            states = encode_captions(missing, self.text_encoder, self.tokenizer)
            self._caption_cache.update({p: s.cpu() for p, s in zip(missing, states, strict=True)})
        dtype = self.denoiser.dtype
        return torch.stack([self._caption_cache[p] for p in prompts]).to(self.device, dtype)

    @staticmethod
    def _as_list(prompt: str | list[str], count: int) -> list[str]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        return [p for p in prompts for _ in range(count)]

    def _start(
        self, batch: int, generator, latents, image, strength: float, num_inference_steps: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial sample and the timesteps to run (a tail of the schedule for img2img)."""
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = self.scheduler.timesteps
        size = self.denoiser.config.sample_size
        channels = self.denoiser.config.in_channels
        shape = (batch, channels, size, size)
        dtype = self.denoiser.dtype
        noise = latents if latents is not None else randn_tensor(
            shape, generator=generator, device=self.device, dtype=dtype
        )
        if image is None:
            # Karras sigmas on the cosine schedule repeat a timestep (998, 998, ...); without an explicit
            # begin index the scheduler starts at the repeat's second entry and runs off its sigma table
            if hasattr(self.scheduler, "set_begin_index"):
                self.scheduler.set_begin_index(0)
            return noise.to(self.device, dtype) * self.scheduler.init_noise_sigma, timesteps
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        order = getattr(self.scheduler, "order", 1)
        keep = min(int(num_inference_steps * strength), num_inference_steps)
        if keep < 1:
            raise ValueError(f"strength {strength} × num_inference_steps {num_inference_steps} leaves no denoising "
                             "step; raise strength or num_inference_steps")
        start = (num_inference_steps - keep) * order
        timesteps = timesteps[start:]
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start)
        image = torch.as_tensor(image).to(self.device, dtype)
        if image.ndim == 3:
            image = image.unsqueeze(0)
        image = image.expand(batch, -1, -1, -1)
        return self.scheduler.add_noise(image, noise, timesteps[:1].repeat(batch)), timesteps

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        strength: float = 0.6,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ):
        if output_type not in ("pil", "np", "pt"):  # refuse before the denoising loop, not after it
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        prompts = self._as_list(prompt, num_images_per_prompt)
        batch = len(prompts)
        negatives = self._as_list(negative_prompt if negative_prompt is not None else "", 1)
        if len(negatives) == 1:
            negatives = negatives * batch
        elif len(negatives) * num_images_per_prompt == batch:
            negatives = self._as_list(negatives, num_images_per_prompt)
        else:
            prompt_count = batch // num_images_per_prompt
            raise ValueError(f"negative_prompt has {len(negatives)} entries for {prompt_count} prompts")
        guided = guidance_scale > 1.0
        text = self.encode_prompt(negatives + prompts if guided else prompts)
        sample, timesteps = self._start(batch, generator, latents, image, strength, num_inference_steps)
        self._num_timesteps = len(timesteps)
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        # like diffusers' prepare_extra_step_kwargs: Heun, PNDM, DEIS... take no generator
        takes_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        step_kwargs = {"generator": generator} if takes_generator else {}
        for i, t in enumerate(self.progress_bar(timesteps)):
            model_in = torch.cat([sample, sample]) if guided else sample
            model_in = self.scheduler.scale_model_input(model_in, t)
            pred = self._call_denoiser(model_in, t, text)
            if guided:
                uncond, cond = pred.chunk(2)
                pred = uncond + guidance_scale * (cond - uncond)
            sample = self.scheduler.step(pred, t, sample, **step_kwargs).prev_sample
            if callback_on_step_end is not None:
                local = {"latents": sample}
                changed = callback_on_step_end(self, i, t, {k: local[k] for k in tensor_inputs if k in local})
                sample = changed.get("latents", sample)
        images = (sample.float().clamp(-1, 1) + 1) / 2
        if output_type == "pt":
            out: Any = images
        else:
            out = images.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                pixels = [(im * 255).round().astype(np.uint8) for im in out]
                out = [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=out) if return_dict else (out,)


class TinySDPipeline(_DigitPipeline):
    """Pixel-space text-to-digit pipeline around a ``UNet2DConditionModel``."""

    denoiser_name = "unet"

    def __init__(self, unet, scheduler, text_encoder, tokenizer) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)

    def _call_denoiser(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=text, return_dict=False)[0]


class TinyDiTPipeline(_DigitPipeline):
    """Pixel-space text-to-digit pipeline around a ``PixArtTransformer2DModel`` (or any DiT)."""

    denoiser_name = "transformer"

    def __init__(self, transformer, scheduler, text_encoder, tokenizer) -> None:
        super().__init__()
        self.register_modules(
            transformer=transformer, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer
        )

    def _call_denoiser(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        timestep = t.expand(x.shape[0]) if t.ndim else t.repeat(x.shape[0])
        return self.transformer(
            x, encoder_hidden_states=text, timestep=timestep,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False,
        )[0]
