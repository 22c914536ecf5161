"""Distribution matching distillation (DMD): a one-step generator whose images are pulled, as a distribution, onto
the teacher's by the difference of two scores (optionally with DMD1's regression onto the teacher's own noise →
image pairs).

Yin et al., One-step Diffusion with Distribution Matching Distillation (arXiv 2311.18828); the two-time-scale
update from DMD2 (Yin et al., arXiv 2405.14867). Per training step:

1. **Generate.** The generator (the student: the teacher's weights, a LoRA or all of them trained) is fed pure
   noise at the last timestep; its image is what the pipeline's one trailing DDIM step makes of its output, so
   the student samples with diffusers' DDIMScheduler unchanged.
2. **Critic** (DMD's "fake score"). A full copy of the teacher, trained with the plain denoising loss on the
   generator's latest images (detached), ``critic_updates`` times per generator step (DMD2's two-time-scale
   rule, default 5; DMD: 1): it tracks the distribution the generator currently produces.
3. **Distribution matching.** The image is noised again to a timestep in [0.02 T, 0.98 T]; the teacher with
   classifier-free guidance at the baseline's scale (the real score; guidance is folded in here) and the critic
   (conditional only) each estimate the clean image. Their difference ``fake − real`` is the gradient of
   KL(p_generator ‖ p_teacher) in the image, up to a positive factor per timestep; it is divided per image by
   the mean absolute distance of the image to the real estimate (DMD's normalisation, which makes the step size
   the same at every noise level) and applied through ``½·‖x − sg(x − grad)‖²``, whose gradient in x is exactly
   it.
4. **Regression** (DMD1; off by default). The generator's image from a coupling's noise against the teacher's
   DDIM image from that noise (couplings as rectified flow draws them, ``effdiff.distill.couplings``), weight
   ``regression_weight``.
   DMD uses LPIPS; no LPIPS network is available offline, so this is L2 on the image (as our InstaFlow one-step
   phase). It keeps the generator's noise → image map the teacher's and guards against mode collapse; DMD2 drops
   it for the two-time-scale critic and adds a GAN loss (5.). At the same 28-minute CPU budget on tiny-sd
   DMD2's setting (5 critic updates, no regression: 369 generator steps) scored FID 1.55 against DMD1's (1 update,
   regression 0.25: 673 steps) 2.00, so it is the default; ``--regression-weight 0.25 --critic-updates 1`` is DMD1.
5. **GAN** (DMD2; off by default, ``gan_weight``). A small classifier head (``RealismHead``) on the critic's
   middle-block features tells real training images from generated ones, both noised to a timestep drawn from
   the whole range (DMD2's "diffusion GAN"), with the non-saturating loss: in every critic update at
   ``gan_critic_weight`` (DMD2: 1e-2) beside the denoising loss, head and critic trained together; the generator
   gets ``softplus(−logit)`` of its noised images at ``gan_weight`` (DMD2's SD 1.5 run: 1e-3). The critic's forward
   stops at the middle block (DMD2's "classify mode"): the rest of the call is never computed. This is the one
   place DMD2 uses real images — the matching loss never sees them — so the generator can be pulled past the
   teacher towards the data.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from effdiff.distill.couplings import Couplings, TeacherCouplings
from effdiff.distill.teacher import (
    Denoiser,
    alpha_at,
    clean_and_noise,
    ddim_step,
    guided_prediction,
    prediction_target,
)
from effdiff.distill.trainer import DistillTrainer, denoiser_call

MATCHING_RANGE = (0.02, 0.98)  # DMD's timestep range for the distribution-matching noise, as fractions of T


class _MiddleReached(Exception):  # noqa: N818 - a signal, not an error: it carries the features out of the call
    def __init__(self, features: torch.Tensor) -> None:
        super().__init__("the middle block was reached")
        self.features = features


def middle_features(call: Denoiser, block: Any, noisy: torch.Tensor, timesteps: torch.Tensor,
                    text: torch.Tensor) -> torch.Tensor:
    """The output of ``block`` (an adapter's ``BlockRef``) in ``call(noisy, timesteps, text)``; the call is cut
    there by an exception from the block's forward hook, so the blocks after it cost nothing (their graph is never
    built; what was built up to the block keeps its gradients)."""

    def stop(_module: nn.Module, _args: Any, out: Any) -> None:
        raise _MiddleReached(block.hidden_out(out))

    handle = block.module.register_forward_hook(stop)
    try:
        call(noisy, timesteps, text)
    except _MiddleReached as reached:
        return reached.features
    finally:
        handle.remove()
    raise RuntimeError(f"the call never ran its block {block.name}")


class RealismHead(nn.Module):
    """DMD2's classifier branch: one realism logit per image from the critic's middle-block features.

    DMD2 reduces SD's 8×8 bottleneck with strided 4×4 convolutions to 1×1; here one strided convolution, a
    GroupNorm and SiLU, a 1×1 convolution to a logit map and its mean over the positions — any feature size works.
    A transformer's tokens (batch, tokens, channels) are laid out on their square grid first (one row when the
    count is not a square)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, channels, 3, stride=2, padding=1),
                                 nn.GroupNorm(math.gcd(32, channels), channels), nn.SiLU(),
                                 nn.Conv2d(channels, 1, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() == 3:
            batch, tokens, channels = features.shape
            side = math.isqrt(tokens)
            height, width = (side, side) if side * side == tokens else (1, tokens)
            features = features.transpose(1, 2).reshape(batch, channels, height, width)
        weight = self.net[0].weight
        return self.net(features.to(weight.dtype)).mean(dim=(1, 2, 3))


@dataclass
class DistributionMatchingObjective:
    """The generator's and the critic's losses; ``couplings`` are set when the run first needs them."""

    generator: Denoiser
    teacher: Denoiser
    critic: Denoiser
    alphas_cumprod: torch.Tensor
    final_alpha: float
    prediction_type: str
    guidance: float = 4.0
    couplings: Couplings | None = None
    middle: Any = None  # the critic's middle block (a BlockRef) and the head on it: the GAN, when one is trained
    head: RealismHead | None = None

    def _alpha(self, timesteps: torch.Tensor) -> torch.Tensor:
        return alpha_at(self.alphas_cumprod, timesteps, self.final_alpha)

    def generate(self, noise: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """One trailing DDIM step of the generator from pure noise: the image the sampling pipeline returns."""
        last = torch.full((len(noise),), len(self.alphas_cumprod) - 1, device=noise.device)
        prediction = self.generator(noise, last, text)
        return ddim_step(prediction, noise, self._alpha(last), self._alpha(torch.full_like(last, -1)),
                         self.prediction_type)

    def _noised(self, images: torch.Tensor, timesteps: torch.Tensor,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        noise = torch.randn(images.shape, generator=generator).to(images.device, images.dtype)
        alpha = self._alpha(timesteps)
        return alpha.sqrt() * images + (1 - alpha).sqrt() * noise, noise, alpha

    def critic_loss(self, images: torch.Tensor, text: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The plain denoising loss of the critic on (detached) generated images, at any timestep."""
        timesteps = torch.randint(0, len(self.alphas_cumprod), (len(images),), generator=generator).to(images.device)
        noisy, noise, alpha = self._noised(images.detach(), timesteps, generator)
        target = prediction_target(images.detach(), noise, alpha, self.prediction_type)
        return (self.critic(noisy, timesteps, text).float() - target.float()).pow(2).mean()

    def matching_loss(self, images: torch.Tensor, text: torch.Tensor, uncond: torch.Tensor,
                      generator: torch.Generator) -> torch.Tensor:
        """DMD's distribution-matching loss: its gradient in ``images`` is (critic's − teacher's clean estimate),
        normalised per image."""
        total = len(self.alphas_cumprod)
        low, high = (round(f * total) for f in MATCHING_RANGE)
        timesteps = torch.randint(low, high, (len(images),), generator=generator).to(images.device)
        with torch.no_grad():
            noisy, _, alpha = self._noised(images.detach(), timesteps, generator)
            real, _ = clean_and_noise(guided_prediction(self.teacher, noisy, timesteps, text,
                                                        uncond.expand_as(text), self.guidance),
                                      noisy, alpha, self.prediction_type)
            fake, _ = clean_and_noise(self.critic(noisy, timesteps, text), noisy, alpha, self.prediction_type)
            scale = (images.detach() - real).abs().float().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)
            step = torch.nan_to_num((fake - real).float() / scale)
            target = images.detach().float() - step
        return 0.5 * (images.float() - target).pow(2).mean()

    def realism(self, images: torch.Tensor, text: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The head's logit for each image noised to a timestep anywhere in the range (DMD2's diffusion GAN)."""
        timesteps = torch.randint(0, len(self.alphas_cumprod), (len(images),), generator=generator).to(images.device)
        noisy, _, _ = self._noised(images, timesteps, generator)
        return self.head(middle_features(self.critic, self.middle, noisy, timesteps, text)).float()

    def critic_gan_loss(self, real: torch.Tensor, real_text: torch.Tensor, fake: torch.Tensor,
                        text: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The head's non-saturating classification loss: real images to positive logits, generated (detached)
        ones to negative."""
        return (F.softplus(-self.realism(real, real_text, generator)).mean()
                + F.softplus(self.realism(fake.detach(), text, generator)).mean())

    def generator_gan_loss(self, images: torch.Tensor, text: torch.Tensor,
                           generator: torch.Generator) -> torch.Tensor:
        """The generator's non-saturating GAN loss: its images should look real to the head."""
        return F.softplus(-self.realism(images, text, generator)).mean()

    def regression_loss(self, images: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """L2 between the generator's images from coupling noises ``rows`` and the teacher's images from them."""
        return (images.float() - self.couplings.images[rows].float()).pow(2).mean()


class DmdTrainer(TeacherCouplings, DistillTrainer):
    """The generator is ``parts["weights"]`` (trained by the shared loop); the critic trains inside
    ``step_loss`` with its own AdamW on the same learning-rate schedule scaled to ``critic_lr``."""

    def _objective(self) -> DistributionMatchingObjective:
        from effdiff.adapters import adapter_for

        c = self.config
        self.critic = copy.deepcopy(self.teacher).requires_grad_(True).train()
        self.critic_losses: list[float] = []
        self.gan_losses: list[float] = []
        objective = DistributionMatchingObjective(
            generator=denoiser_call(self.student, self.is_dit), teacher=denoiser_call(self.teacher, self.is_dit),
            critic=denoiser_call(self.critic, self.is_dit), alphas_cumprod=self.alphas_cumprod,
            final_alpha=float(self.pipe.scheduler.final_alpha_cumprod), prediction_type=self.prediction_type,
            guidance=c.guidance)
        self.critic_trained = list(self.critic.parameters())
        if c.gan_weight:
            objective.middle = adapter_for(self.critic).middle_block()
            with torch.no_grad():  # one call tells the head how many channels the middle block returns
                features = middle_features(objective.critic, objective.middle, self.images[:1],
                                           torch.zeros(1, dtype=torch.long, device=self.device),
                                           self.uncond.reshape(1, *self.uncond.shape[-2:]))
            objective.head = RealismHead(features.shape[1 if features.dim() == 4 else -1]).to(self.device)
            self.critic_trained += list(objective.head.parameters())
        self.critic_opt = torch.optim.AdamW(self.critic_trained, lr=c.critic_lr, weight_decay=0.0)
        return objective

    def _critic_step(self, images: torch.Tensor, text: torch.Tensor) -> None:
        for group in self.critic_opt.param_groups:
            group["lr"] = self.lr_at(self.step) * self.config.critic_lr / self.config.lr
        loss = self.objective.critic_loss(images, text, self.gen)
        if self.config.gan_weight:
            real, real_text = self._batch()
            gan = self.objective.critic_gan_loss(real, real_text, images, text, self.gen)
            loss = loss + self.config.gan_critic_weight * gan
            self.gan_losses.append(round(gan.item(), 6))
        self.critic_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.critic_trained, 1.0)
        self.critic_opt.step()
        self.critic_losses.append(round(loss.item(), 6))

    def step_loss(self) -> torch.Tensor:
        c, objective = self.config, self.objective
        if objective.couplings is None and c.regression_weight:
            objective.couplings = self.couplings_from(self.teacher, c.guidance, self.run_dir / "couplings-teacher.pt")
        _, text = self._batch()
        noise = torch.randn((c.batch_size, *self.images.shape[1:]), generator=self.gen).to(self.device)
        if c.regression_weight:
            rows = torch.randint(0, c.couplings, (c.batch_size,), generator=self.gen).to(self.device)
            pairs = objective.couplings
            both = objective.generate(torch.cat([noise, pairs.noise[rows]]), torch.cat([text, pairs.text[rows]]))
            images, regressed = both.split(c.batch_size)
        else:
            images = objective.generate(noise, text)
        self._critic_step(images, text)
        for _ in range(c.critic_updates - 1):
            more = torch.randn(noise.shape, generator=self.gen).to(self.device)
            with torch.no_grad():
                more_images = objective.generate(more, text)
            self._critic_step(more_images, text)
        loss = objective.matching_loss(images, text, self.uncond, self.gen)
        if c.regression_weight:
            loss = loss + c.regression_weight * objective.regression_loss(regressed, rows)
        if c.gan_weight:
            loss = loss + c.gan_weight * objective.generator_gan_loss(images, text, self.gen)
        return loss

    def _state(self) -> dict[str, Any]:
        head = self.objective.head
        return {**super()._state(), "critic": self.critic.state_dict(), "critic_opt": self.critic_opt.state_dict(),
                "critic_losses": self.critic_losses, "gan_losses": self.gan_losses,
                "head": head.state_dict() if head is not None else None}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.critic.load_state_dict(state["critic"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.critic_losses = state["critic_losses"]
        self.gan_losses = state.get("gan_losses", [])
        if self.objective.head is not None:
            self.objective.head.load_state_dict(state["head"])

    def record(self) -> dict[str, Any]:
        c = self.config
        data = "the captions of the 4,000 training digits" + ("" if c.gan_weight else " (no training image used)")
        if c.regression_weight:
            data += (f"; {c.couplings} couplings: noise → the teacher's DDIM-{c.coupling_steps} sample with CFG "
                     f"{c.guidance}")
        if c.gan_weight:
            data += "; the 4,000 training digits as the GAN's real images"
        tail, gan = self.critic_losses[-100:], self.gan_losses[-100:]
        return {**super().record(), "data": data, "critic_loss_avg100": sum(tail) / max(1, len(tail)),
                **({"gan_classification_loss_avg100": sum(gan) / len(gan)} if gan else {})}
