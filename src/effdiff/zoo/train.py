"""Training of the bundled models: seeded, checkpointed, resumable, with EMA weights.

Generators learn v-prediction on the cosine schedule with 10 % caption dropout (so classifier-free
guidance works); the classifier learns the digits with small random shifts so that it judges
generated digits, not only centred ones. The ``scene-*`` models train on digit scenes rendered on the
fly from the scene bundle (zoo/scene_data.py) instead of single digits.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from effdiff.zoo.architectures import (
    NOISE_SCHEDULE,
    DigitClassifier,
    build_scene_dit,
    build_scene_sd,
    build_tiny_dit,
    build_tiny_sd,
    default_scheduler,
)
from effdiff.zoo.captions import caption_bank, caption_states
from effdiff.zoo.checkpoints import CLASSIFIERS, DENOISER_FOLDER
from effdiff.zoo.data import load_digits
from effdiff.zoo.ranges import refuse_out_of_range

GENERATORS = {"tiny-sd": build_tiny_sd, "tiny-dit": build_tiny_dit, "scene-sd": build_scene_sd,
              "scene-dit": build_scene_dit}
TRAINABLE = (*GENERATORS, *CLASSIFIERS)
SCENE_MODELS = ("scene-sd", "scene-dit", "scene-judge")


@dataclass
class TrainConfig:
    model: str
    seed: int = 0
    steps: int = 20000
    batch_size: int = 256
    lr: float = 1e-3
    warmup: int = 500
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    checkpoint_every: int = 1000
    max_minutes: float | None = None  # wall-clock budget; then the run is no longer bit-deterministic
    device: str = "cpu"
    bf16: bool = False


def predict(model: torch.nn.Module, noisy: torch.Tensor, text: torch.Tensor, timesteps: torch.Tensor,
            is_dit: bool) -> torch.Tensor:
    """One call of a bundled denoiser (U-Net or PixArt-style DiT) on a batch of per-sample timesteps."""
    if is_dit:
        return model(noisy, encoder_hidden_states=text, timestep=timesteps,
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    return model(noisy, timesteps, encoder_hidden_states=text, return_dict=False)[0]


def _denoise_loss(model, images, text, timesteps, noise, schedule: DDPMScheduler, is_dit: bool):
    noisy = schedule.add_noise(images, noise, timesteps)
    pred = predict(model, noisy, text, timesteps, is_dit)
    target = schedule.get_velocity(images, noise, timesteps)
    return torch.nn.functional.mse_loss(pred.float(), target.float())


def _shift(images: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels (background is -1)."""
    padded = torch.nn.functional.pad(images, (max_shift,) * 4, value=-1.0)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2,), generator=gen).tolist()
    size = images.shape[-1]
    return padded[..., dy : dy + size, dx : dx + size]


def warmup_cosine_lr(lr: float, step: int, warmup: int, steps: int, elapsed: float,
                     max_minutes: float | None) -> float:
    """Linear warm-up, then cosine decay to a tenth of ``lr``; a time budget decays by whichever runs out first."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    if max_minutes:
        progress = max(progress, elapsed / (max_minutes * 60))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def caption_of(labels: torch.Tensor, per_digit: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Caption states for each digit label, one of its caption templates drawn at random per sample."""
    template = torch.randint(0, per_digit.shape[1], (len(labels),), generator=gen).to(per_digit.device)
    return per_digit[labels, template]


class SteppedTraining:
    """The optimisation loop both trainers share (the bundled models', ``effdiff distill``'s): learning-rate
    schedule, clipped step, averages, progress bar, checkpoints and the wall-clock budget. A subclass gives the
    loss, what to average after each step, its checkpoint, and the (total steps, lr, warm-up, checkpoint
    interval, minutes) in ``loop_settings``."""

    opt: torch.optim.Optimizer
    step: int
    elapsed: float
    losses: list[float]

    def loop_settings(self) -> tuple[int, float, int, int, float | None]:
        raise NotImplementedError

    def step_loss(self) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self) -> None:
        """Update the averaged weights (EMA) after the optimiser step."""

    def lr_at(self, step: int) -> float:
        """The learning rate of ``step``: warm-up and cosine decay over the whole run (a subclass that trains in
        rounds restarts it per round)."""
        total, lr, warmup, _, max_minutes = self.loop_settings()
        return warmup_cosine_lr(lr, step, warmup, total, self.elapsed, max_minutes)

    def save_checkpoint(self) -> None:
        raise NotImplementedError

    def autocast(self) -> torch.autocast:
        """bf16 autocast around the loss where the config asks for it (``--bf16``): on a GPU, or a CPU with
        AVX512-BF16/AMX (tiny-sd's forward and backward at batch 32: 1.28× faster on a 2-core Xeon with AMX).
        The weights, the optimiser and the EMA stay fp32; the teacher's targets are computed in bf16 too."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=getattr(self.config, "bf16", False))

    def run_steps(self, desc: str) -> None:
        total, _, _, checkpoint_every, max_minutes = self.loop_settings()
        start = time.perf_counter() - self.elapsed
        bar = tqdm(total=total, initial=self.step, desc=desc)
        trainable = [p for group in self.opt.param_groups for p in group["params"]]
        while self.step < total:
            for group in self.opt.param_groups:
                group["lr"] = self.lr_at(self.step)
            with self.autocast():
                loss = self.step_loss()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            self.opt.step()
            self.after_step()
            self.step += 1
            self.losses.append(round(loss.item(), 6))
            bar.update(1)
            bar.set_postfix(loss=f"{sum(self.losses[-100:]) / len(self.losses[-100:]):.5f}")
            self.elapsed = time.perf_counter() - start
            if self.step % checkpoint_every == 0:
                self.save_checkpoint()
            if max_minutes is not None and self.elapsed > max_minutes * 60:
                break
        bar.close()
        self.save_checkpoint()


class Trainer(SteppedTraining):
    """Runs one model's training to ``config.steps`` and writes checkpoints and final weights to ``out``."""

    def __init__(self, config: TrainConfig, out: Path) -> None:
        refuse_out_of_range(config)
        self.config, self.out = config, Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(config.device)
        torch.manual_seed(config.seed)
        self.gen = torch.Generator().manual_seed(config.seed)
        # scene batches draw their pixel noise on the device: 3-6 M normals a step on the CPU would stall a GPU
        self.noise_gen = self.gen
        if config.model in SCENE_MODELS:
            self.noise_gen = torch.Generator(self.device).manual_seed(config.seed)
            torch.backends.cudnn.benchmark = True  # fixed shapes; a no-op off the GPU
        self.is_classifier = config.model in CLASSIFIERS
        self.model = self._build_model().to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=0.01)
        self.step, self.elapsed, self.losses = 0, 0.0, []
        if config.model in SCENE_MODELS:
            from effdiff.zoo.scene_data import SceneSampler, scene_bundle

            self.bundle = scene_bundle()
            self.scenes: SceneSampler | None = SceneSampler(self.bundle, self.device)
        else:
            self.scenes = None
            split = load_digits()
            self.images, self.labels = split.train_images.to(self.device), split.train_labels.to(self.device)
            per_digit, uncond = caption_bank(caption_states())
            self.per_digit, self.uncond = per_digit.to(self.device), uncond.to(self.device)
        self.schedule = DDPMScheduler(**{k: v for k, v in NOISE_SCHEDULE.items() if k != "set_alpha_to_one"})
        self.schedule.alphas_cumprod = self.schedule.alphas_cumprod.to(self.device)

    def _build_model(self) -> torch.nn.Module:
        if self.config.model == "scene-judge":
            from effdiff.zoo.scene_judge import SceneJudge

            return SceneJudge()
        return DigitClassifier() if self.is_classifier else GENERATORS[self.config.model]()

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def resume(self) -> None:
        if not self.checkpoint_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {self.checkpoint_path}")
        state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.step, self.elapsed, self.losses = state["step"], state["elapsed"], state["losses"]
        # map_location moved the RNG states to the device too; generators only take CPU ByteTensors
        self.gen.set_state(state["gen"].cpu())
        if "noise_gen" in state:
            self.noise_gen.set_state(state["noise_gen"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())

    def save_checkpoint(self) -> None:
        tmp = self.checkpoint_path.with_suffix(".tmp")
        state = {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                 "step": self.step, "elapsed": self.elapsed, "losses": self.losses,
                 "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state()}
        if self.noise_gen is not self.gen:
            state["noise_gen"] = self.noise_gen.get_state()
        torch.save(state, tmp)
        tmp.replace(self.checkpoint_path)

    def loop_settings(self) -> tuple[int, float, int, int, float | None]:
        c = self.config
        return c.steps, c.lr, c.warmup, c.checkpoint_every, c.max_minutes

    def after_step(self) -> None:
        decay = min(self.config.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters(), strict=True):
                e.lerp_(p, 1 - decay)

    def step_loss(self) -> torch.Tensor:
        c = self.config
        if self.scenes is not None:
            return self._scene_loss()
        idx = torch.randint(0, len(self.images), (c.batch_size,), generator=self.gen).to(self.device)
        images, labels = self.images[idx], self.labels[idx]
        if self.is_classifier:
            return torch.nn.functional.cross_entropy(self.model(_shift(images, self.gen)), labels)
        text = caption_of(labels, self.per_digit, self.gen)
        drop = (torch.rand(c.batch_size, generator=self.gen) < c.caption_dropout).to(self.device)
        text = torch.where(drop[:, None, None], self.uncond.expand_as(text), text)
        return self._generator_loss(images, text)

    def _generator_loss(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        timesteps = torch.randint(0, 1000, (len(images),), generator=self.gen).to(self.device)
        noise = torch.randn(images.shape, generator=self.noise_gen, device=self.noise_gen.device).to(self.device)
        is_dit = DENOISER_FOLDER[self.config.model] == "transformer"
        return _denoise_loss(self.model, images, text, timesteps, noise, self.schedule, is_dit)

    def _scene_loss(self) -> torch.Tensor:
        c = self.config
        if self.is_classifier:
            from effdiff.zoo.scene_judge import judge_loss

            return judge_loss(self.model, *self.scenes.labelled_batch(c.batch_size, self.gen, self.noise_gen))
        return self._generator_loss(*self.scenes.caption_batch(c.batch_size, self.gen, c.caption_dropout))

    def run(self) -> None:
        self.run_steps(f"train {self.config.model}")
        self.export()

    def export(self) -> None:
        """Write the EMA weights in diffusers layout plus a training record."""
        from effdiff.zoo.checkpoints import save_model

        record = {"config": asdict(self.config), "steps_done": self.step, "wall_seconds": round(self.elapsed, 1),
                  "machine": f"{platform.node()} {platform.processor() or platform.machine()} "
                             f"{torch.cuda.get_device_name() if self.device.type == 'cuda' else 'cpu'}",
                  "final_loss_avg100": sum(self.losses[-100:]) / max(1, len(self.losses[-100:])),
                  "parameters": sum(p.numel() for p in self.ema.parameters())}
        if self.config.model == "scene-judge":
            from effdiff.zoo.scene_judge import heldout_accuracy

            accuracy = heldout_accuracy(self.ema.eval(), self.bundle, device=self.device)
            record["heldout_accuracy"] = {head: round(value, 4) for head, value in accuracy.items()}
        save_model(self.config.model, self.ema.cpu(), default_scheduler(), self.out / "export", record)


def train(config: TrainConfig, out: Path, resume: bool = False) -> Path:
    """Train (or continue) one bundled model; returns the folder of its exported weights."""
    if config.model not in TRAINABLE:
        raise ValueError(f"unknown model {config.model!r}; trainable: {', '.join(TRAINABLE)}")
    trainer = Trainer(config, out)
    if resume:
        trainer.resume()
    trainer.run()
    return trainer.out / "export"


def add_config_flags(parser, config: type, ints: tuple[str, ...], floats: tuple[str, ...]) -> None:
    """``--a-field`` flags for a config dataclass's int and float fields, defaulting to the class's values."""
    for kind, fields in ((int, ints), (float, floats)):
        for field in fields:
            parser.add_argument(f"--{field.replace('_', '-')}", type=kind, default=getattr(config, field))


def config_from_arguments(config: type, args, **fixed: Any) -> Any:
    """The config dataclass from the parsed flags it has a field for (the rest keep their defaults), printed as
    the run's first line so a log says how it was made."""
    fields = {f: getattr(args, f) for f in config.__dataclass_fields__ if hasattr(args, f) and f not in fixed}
    made = config(**fields, **fixed)
    print(json.dumps(asdict(made)))
    return made


def add_job_flags(parser, command: str) -> None:
    """The flags every training job of a trained-artefact command shares: device, run and export folders,
    resume."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 autocast (a GPU, or a CPU with AVX512-BF16/AMX); weights stay fp32")
    parser.add_argument("--run", type=Path, help=f"checkpoint folder (default runs/{command}/MODEL-…)")
    parser.add_argument("--out", type=Path, help=f"export folder (default: beside the model, {command}/…)")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")


def train_and_export(trainer: Any, resume: bool) -> Path:
    """Continue from the checkpoint if asked, train to the end, export; returns the export folder."""
    if resume:
        trainer.resume()
    trainer.train()
    return trainer.export()


def add_train_arguments(parser) -> None:
    """The training flags, shared by ``effdiff zoo train`` and ``python -m effdiff.zoo.train``."""
    parser.add_argument("model", choices=TRAINABLE)
    parser.add_argument("--out", type=Path, help="run folder (default runs/MODEL)")
    add_config_flags(parser, TrainConfig, ("seed", "steps", "batch_size", "checkpoint_every"),
                     ("lr", "max_minutes"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")


def train_from_arguments(args) -> Path:
    config = config_from_arguments(TrainConfig, args)
    return train(config, args.out or Path("runs") / config.model, args.resume)


if __name__ == "__main__":  # used on the GPU machine, where the package is not installed
    import argparse

    parser = argparse.ArgumentParser(prog="python -m effdiff.zoo.train")
    add_train_arguments(parser)
    print(train_from_arguments(parser.parse_args()))
