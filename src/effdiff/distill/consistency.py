"""The latent consistency distillation objective (LCM), on a DDPM-trained teacher with classifier-free guidance.

One training example: a data sample noised to a grid timestep ``t_n + k`` of the teacher's 50-step DDIM grid; the
teacher, guided at scale ``w``, takes one DDIM step to ``t_n``; the student's consistency function at ``t_n + k``
must match the (gradient-free) target's at ``t_n``. The consistency function is the model's clean-sample estimate
under LCM's boundary scalings, ``f(x, t) = c_skip(t)·x + c_out(t)·x̂₀(x, t)``, so ``f(x, 0) = x`` exactly. The
scalings are those of diffusers' ``LCMScheduler`` (σ_data 0.5, timesteps × 10), so a student trained here samples
with that scheduler unchanged.

Papers: Consistency Models (Song et al., arXiv 2303.01469); Latent Consistency Models (Luo et al., arXiv
2310.04378), whose skipping-step DDIM solver and guided teacher this follows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effdiff.distill.teacher import Denoiser, clean_and_noise, ddim_step, guided_prediction

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10.0


def boundary_scalings(timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) per timestep, broadcastable over images: c_skip(0) = 1 and c_out(0) = 0."""
    scaled = timesteps.double() * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2).sqrt()
    return c_skip.float()[:, None, None, None], c_out.float()[:, None, None, None]


def solver_grid(train_timesteps: int, ddim_steps: int) -> tuple[torch.Tensor, int]:
    """The teacher's DDIM grid ``[k-1, 2k-1, …, T-1]`` (the one LCMScheduler draws its timesteps from) and ``k``."""
    skip = train_timesteps // ddim_steps
    return torch.arange(1, ddim_steps + 1) * skip - 1, skip


@dataclass
class ConsistencyObjective:
    """Computes the consistency-distillation loss of one batch.

    ``student`` has the gradient; ``target`` is the gradient-free network whose output at ``t_n`` the student
    must match (the online student for LCM-LoRA, an EMA of it for a fully trained LCM); ``teacher`` is the
    frozen original. ``guidance`` is the pipeline's scale (``uncond + w·(cond − uncond)``), folded into the
    student so that it samples without a classifier-free-guidance pass.
    """

    teacher: Denoiser
    student: Denoiser
    target: Denoiser
    alphas_cumprod: torch.Tensor
    prediction_type: str
    guidance: float = 4.0
    ddim_steps: int = 50
    loss: str = "l2"
    huber_c: float = 0.001

    def __post_init__(self) -> None:
        self.grid, self.skip = solver_grid(len(self.alphas_cumprod), self.ddim_steps)

    def _alpha(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod.to(timesteps.device)[timesteps][:, None, None, None]

    def consistency(self, model: Denoiser, noisy: torch.Tensor, timesteps: torch.Tensor,
                    text: torch.Tensor) -> torch.Tensor:
        """f(x, t) = c_skip·x + c_out·x̂₀."""
        clean, _ = clean_and_noise(model(noisy, timesteps, text), noisy, self._alpha(timesteps), self.prediction_type)
        c_skip, c_out = boundary_scalings(timesteps)
        return c_skip * noisy + c_out * clean

    @torch.no_grad()
    def teacher_step(self, noisy: torch.Tensor, start: torch.Tensor, end: torch.Tensor, text: torch.Tensor,
                     uncond: torch.Tensor) -> torch.Tensor:
        """One guided DDIM step of the teacher from ``start`` to ``end`` (both halves of CFG in one batch)."""
        guided = guided_prediction(self.teacher, noisy, start, text, uncond, self.guidance)
        return ddim_step(guided, noisy, self._alpha(start), self._alpha(end), self.prediction_type)

    def __call__(self, images: torch.Tensor, text: torch.Tensor, uncond: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
        batch, device = len(images), images.device
        index = torch.randint(0, len(self.grid), (batch,), generator=generator)
        start = self.grid[index].to(device)
        end = (start - self.skip).clamp(min=0)
        noise = torch.randn(images.shape, generator=generator).to(device, images.dtype)
        alpha_start = self._alpha(start)
        noisy = alpha_start.sqrt() * images + (1 - alpha_start).sqrt() * noise
        prediction = self.consistency(self.student, noisy, start, text)
        previous = self.teacher_step(noisy, start, end, text, uncond.expand_as(text))
        with torch.no_grad():
            target = self.consistency(self.target, previous, end, text)
        difference = prediction.float() - target.float()
        if self.loss == "huber":
            return ((difference**2 + self.huber_c**2).sqrt() - self.huber_c).mean()
        return (difference**2).mean()
