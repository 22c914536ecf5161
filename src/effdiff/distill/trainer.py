"""``effdiff distill``: trains a student of a bundled model — seeded, checkpointed, resumable, with EMA.

Methods: ``lcm`` (consistency distillation, ``consistency.py``), ``guidance-distill`` (one pass per step at any
guidance scale, ``guidance.py``), ``progressive`` (halving the steps per round, ``progressive.py``),
``rectflow`` (reflow on the teacher's couplings, then one step, ``rectflow.py``; the last two train in phases,
``phased.py``) and ``dmd`` (a one-step generator by distribution matching against a critic, ``dmd.py``).
Two forms each: ``lora`` trains low-rank deltas on the frozen teacher (for LCM the target is then
the online student, as in LCM-LoRA's recipe, Luo et al., arXiv 2311.05556), ``full`` trains every weight of a
copy (LCM's target is then an EMA of the student, decay 0.95). Either way the exported weights are an EMA of the
trained ones. The data are the 4,000 training digits with their captions (rectflow and dmd use only the captions); the
teacher supplies every target, so no label beyond the caption is used.

What it writes, beside the model unless ``--out`` says otherwise: ``distill/<method>-lora/lora.safetensors`` (a
few hundred kB) or ``distill/<method>/`` (a diffusers denoiser folder), a guidance student's
``guidance_embedding.safetensors``, one folder per phase (progressive's ``steps-N``, rectflow's ``reflow`` and
``onestep``); each with
``effdiff_distill.json``: teacher and its fingerprint, data, iterations, wall time, machine.
"""

from __future__ import annotations

import copy
import json
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from effdiff.distill import lora
from effdiff.distill.consistency import ConsistencyObjective
from effdiff.distill.guidance import WEIGHTINGS, GuidanceEmbedding, GuidanceObjective, embedding_width
from effdiff.distill.store import GUIDANCE_FILE, RECORD, default_output, student_folder
from effdiff.zoo.ranges import refuse_out_of_range
from effdiff.zoo.train import (
    SteppedTraining,
    add_config_flags,
    add_job_flags,
    caption_of,
    config_from_arguments,
    predict,
    train_and_export,
)

FORMS = ("lora", "full")
METHODS = ("lcm", "guidance-distill", "progressive", "rectflow", "dmd")
DISTILLABLE = ("tiny-sd", "tiny-dit")


@dataclass
class DistillConfig:
    model: str
    method: str = "lcm"
    form: str = "lora"
    seed: int = 0
    iterations: int = 1200  # about 30 min on 2 CPU cores (1.5 s an iteration at batch 32); progressive: all rounds
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 50  # progressive: per round
    rank: int = 4
    exclude: str | None = None  # regex of layer names the LoRA leaves frozen; None: "adaln_single" on a DiT, else ""
    guidance: float = 4.0  # the baseline's CFG scale, folded into an lcm or progressive student
    ddim_steps: int = 50  # lcm: the teacher's solver grid (LCM's skipping step k = 1000 / 50)
    loss: str = "l2"
    ema_decay: float = 0.995
    target_decay: float = 0.95  # lcm full form only: the consistency target is an EMA of the student
    w_min: float = 1.0  # guidance-distill: the range of guidance scales the student learns
    w_max: float = 8.0
    weighting: str = "uniform"  # guidance-distill: "relative" weighs each error by the size of cond − uncond
    start_steps: int = 8  # progressive: the first student's steps (its teacher samples in twice as many)
    couplings: int = 1536  # rectflow (per phase) and dmd's regression: noise -> image pairs sampled by the teacher
    coupling_steps: int = 12  # rectflow, dmd: the DDIM steps that sample them
    reflow_share: float = 0.67  # rectflow: the reflow phase's part of the iterations (the rest: one step)
    regression_weight: float = 0.0  # dmd: L2 regression onto the teacher's couplings (DMD1: 0.25); 0: none (DMD2)
    critic_updates: int = 5  # dmd: critic steps per generator step (DMD2's two-time-scale rule; DMD1: 1)
    critic_lr: float = 3e-4  # dmd: the critic (a full copy of the teacher) learns at this peak rate
    gan_weight: float = 0.0  # dmd: DMD2's GAN loss on the generator (DMD2's SD 1.5 run: 1e-3); 0: no GAN
    gan_critic_weight: float = 1e-2  # dmd: the realism head's classification loss beside the critic's (DMD2: 1e-2)
    checkpoint_every: int = 200
    max_minutes: float | None = None  # wall-clock budget; then the run is no longer bit-deterministic
    eval_steps: int = 4  # lcm: recorded (it samples any 1-8); progressive: the last round's steps
    device: str = "cpu"
    bf16: bool = False  # bf16 autocast around the loss (SteppedTraining.autocast)


def teacher_pipeline(model: str, command: str = "distill") -> Any:
    """The bundled model, or a local folder of one (a retrained tiny-sd, say); anything else is refused before a
    twin or a hub model is built (``command`` names what refuses: distill trains students, compress finetunes
    pruned models, both on the bundled data)."""
    from effdiff.zoo.checkpoints import read_record
    from effdiff.zoo.load import load

    folder = Path(model).expanduser()
    if model not in DISTILLABLE and not (folder.is_dir() and read_record(folder).get("name") in DISTILLABLE):
        raise ValueError(f"{command} works on {', '.join(DISTILLABLE)} (bundled, or a local folder of one "
                         f"with its effdiff_model.json), not {model!r}")
    return load(model)


def default_exclude(is_dit: bool) -> str:
    """What a LoRA leaves frozen by default: on a DiT, adaLN-single (the timestep embedder and the one linear that
    modulates every block). With deltas there, tiny-dit's LCM-LoRA diverged (run recorded in benchmarks/results/
    distill/tiny-dit-lcm-lora-diverged.json); frozen, it trained."""
    return "adaln_single" if is_dit else ""


def denoiser_call(model: torch.nn.Module, is_dit: bool):
    """``(x_t, t, text) -> output`` of a bundled denoiser, the signature the objectives take."""
    return lambda x, t, text: predict(model, x, text, t, is_dit)


def part_state(state: dict[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
    """One entry of ``DistillTrainer.parts`` out of a state dict of all of them, its prefix dropped."""
    prefix = f"{part}."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def training_data(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the 4,000 training digits, their labels, per-digit caption states, the unconditional states) on
    ``device``: what every trainer of a bundled model's derivative draws its batches from."""
    from effdiff.zoo.captions import caption_bank, caption_states
    from effdiff.zoo.data import load_digits

    split = load_digits()
    per_digit, uncond = caption_bank(caption_states())
    return (split.train_images.to(device), split.train_labels.to(device), per_digit.to(device),
            uncond.to(device))


def machine(device: torch.device) -> str:
    """Where a training ran, for its record: host, CPU model and SIMD extensions (its wall time depends on them),
    the GPU where one trained it, threads."""
    from effdiff.host import cpu_description

    return (f"{platform.node()} {cpu_description()} "
            f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} threads={torch.get_num_threads()}")


class DistillTrainer(SteppedTraining):
    """One student's training to ``config.iterations``; checkpoints in ``run``, the export in ``out``.

    ``parts`` holds what is trained: ``weights`` (the LoRA deltas, or the whole student) and, for a guidance
    student, ``guidance`` (its w embedding); ``ema`` mirrors it.
    """

    # the settings --resume may change
    resumable_changes: tuple[str, ...] = ("iterations", "max_minutes", "device", "checkpoint_every")

    def __init__(self, config: DistillConfig, run: Path, out: Path, pipe: Any = None) -> None:
        """``pipe``: the teacher pipeline, if not the bundled ``config.model`` (a test's tiny random one)."""
        from effdiff.methods.solvers.schedule import model_fingerprint

        refuse_out_of_range(config)
        if config.form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(FORMS)}, got {config.form!r}")
        if config.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {config.method!r}")
        if pipe is None:
            pipe = teacher_pipeline(config.model)
        if config.exclude is None:
            config = replace(config, exclude=default_exclude(pipe.denoiser_name == "transformer"))
        self.config, self.run_dir, self.out = config, Path(run), Path(out)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(config.device)
        torch.manual_seed(config.seed)
        self.gen = torch.Generator().manual_seed(config.seed)
        self.pipe = pipe
        self.teacher = self.pipe.denoiser.to(self.device).eval()
        self.fingerprint = model_fingerprint(self.teacher)
        self.is_dit = self.pipe.denoiser_name == "transformer"
        self.student = copy.deepcopy(self.teacher).requires_grad_(False)
        self.parts = nn.ModuleDict()
        if config.form == "lora":
            self.parts["weights"] = lora.attach(self.student, config.rank, config.seed, exclude=config.exclude)
        else:
            self.student.requires_grad_(True).train()
            self.parts["weights"] = self.student
        if config.method == "guidance-distill":
            self.parts["guidance"] = self._guidance_embedding()
        self.ema = copy.deepcopy(self.parts).requires_grad_(False)
        self.opt = torch.optim.AdamW([p for p in self.parts.parameters() if p.requires_grad], lr=config.lr,
                                     weight_decay=0.0)
        self.step, self.elapsed, self.losses = 0, 0.0, []
        self.images, self.labels, self.per_digit, self.uncond = training_data(self.device)
        self.alphas_cumprod = self.pipe.scheduler.alphas_cumprod.float()
        self.prediction_type = self.pipe.scheduler.config.prediction_type
        self.objective = self._objective()

    def _guidance_embedding(self) -> GuidanceEmbedding:
        from effdiff.adapters import adapter_for

        found = adapter_for(self.student).timestep_embedding()
        if found is None:
            raise ValueError(f"guidance-distill: {type(self.student).__name__} has no shared timestep embedding "
                             "to condition on the guidance scale")
        self.embedding_site, module = found
        embedding = GuidanceEmbedding(embedding_width(module)).to(self.device)
        embedding.attach(module)
        return embedding

    def _objective(self):
        c = self.config
        teacher, student = (denoiser_call(m, self.is_dit) for m in (self.teacher, self.student))
        if c.method == "guidance-distill":
            return GuidanceObjective(teacher=teacher, student=student, embedding=self.parts["guidance"],
                                     alphas_cumprod=self.alphas_cumprod, w_min=c.w_min, w_max=c.w_max,
                                     weighting=c.weighting)
        if c.form == "lora":
            target = self.student  # LCM-LoRA: the online student, without its gradient
        else:
            self.target_model = copy.deepcopy(self.student).requires_grad_(False)
            target = self.target_model
        return ConsistencyObjective(
            teacher=teacher, student=student, target=denoiser_call(target, self.is_dit),
            alphas_cumprod=self.alphas_cumprod, prediction_type=self.prediction_type, guidance=c.guidance,
            ddim_steps=c.ddim_steps, loss=c.loss)

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def _state(self) -> dict[str, Any]:
        state = {"parts": self.parts.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                 "step": self.step, "elapsed": self.elapsed, "losses": self.losses, "gen": self.gen.get_state(),
                 "torch_rng": torch.get_rng_state(), "config": asdict(self.config)}
        if hasattr(self, "target_model"):
            state["target"] = self.target_model.state_dict()
        return state

    def save_checkpoint(self) -> None:
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(self._state(), tmp)
        tmp.replace(self.checkpoint_path)

    def load_state(self, state: dict[str, Any]) -> None:
        """Everything ``_state`` saved, back into this trainer (a subclass adds its own keys)."""
        self.parts.load_state_dict(state["parts"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        if "target" in state:
            self.target_model.load_state_dict(state["target"])
        self.step, self.elapsed, self.losses = state["step"], state["elapsed"], state["losses"]
        self.gen.set_state(state["gen"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())

    def resume(self) -> None:
        if not self.checkpoint_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {self.checkpoint_path}")
        state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=False)
        saved = {k: v for k, v in state["config"].items() if k not in self.resumable_changes}
        differs = {k: (v, getattr(self.config, k, None)) for k, v in saved.items()
                   if getattr(self.config, k, None) != v}
        if differs:
            raise ValueError(f"--resume: the checkpoint was made with other settings (saved, now): {differs}")
        self.load_state(state)

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(self.images), (self.config.batch_size,), generator=self.gen).to(self.device)
        return self.images[idx], caption_of(self.labels[idx], self.per_digit, self.gen)

    def loop_settings(self) -> tuple[int, float, int, int, float | None]:
        c = self.config
        return c.iterations, c.lr, c.warmup, c.checkpoint_every, c.max_minutes

    def step_loss(self) -> torch.Tensor:
        return self.objective(*self._batch(), self.uncond, self.gen)

    def after_step(self) -> None:
        c = self.config
        decay = min(c.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.parts.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
            if hasattr(self, "target_model"):
                for t, p in zip(self.target_model.parameters(), self.student.parameters(), strict=True):
                    t.lerp_(p, 1 - c.target_decay)

    def train(self) -> None:
        c = self.config
        self.run_steps(f"distill {c.model} {c.method}-{c.form}")

    def record(self) -> dict[str, Any]:
        c = self.config
        total = sum(p.numel() for p in self.teacher.parameters())
        trained = sum(p.numel() for p in self.ema.parameters())
        return {"method": c.method, "form": c.form, "teacher": c.model, "teacher_fingerprint": self.fingerprint,
                "data": "4,000 training digits (effdiff.zoo.data) with their captions; targets from the teacher",
                "config": asdict(c), "iterations_done": self.step, "wall_seconds": round(self.elapsed, 1),
                "machine": machine(self.device),
                "final_loss_avg100": sum(self.losses[-100:]) / max(1, len(self.losses[-100:])),
                "teacher_parameters": total, "file_parameters": trained,
                "file_fraction_of_model": round(trained / total, 4), "when": time.strftime("%Y-%m-%d %H:%M:%S")}

    def scheduler(self) -> Any:
        """The scheduler a full student is saved with (what it samples with)."""
        from diffusers import LCMScheduler

        config = self.pipe.scheduler.config
        return LCMScheduler.from_config(config) if self.config.method == "lcm" else type(
            self.pipe.scheduler).from_config(config)

    def write_student(self, weights: dict[str, torch.Tensor], out: Path, record: dict[str, Any]) -> Path:
        """One student (EMA weights of ``parts``) and its record into ``out``."""
        out.mkdir(parents=True, exist_ok=True)
        meta = {"teacher": self.config.model, "teacher_fingerprint": self.fingerprint, "method": self.config.method}
        own = part_state(weights, "weights")
        if self.config.form == "lora":
            deltas = copy.deepcopy(self.ema["weights"])
            deltas.load_state_dict(own)
            lora.save(deltas, out / "lora.safetensors", meta)
        else:
            from effdiff.zoo.checkpoints import save_model

            student = copy.deepcopy(self.student).cpu()
            student.load_state_dict({k: v.cpu() for k, v in own.items()})
            save_model(self.config.model, student.eval().requires_grad_(False), self.scheduler(), out,
                       {"distilled": self.config.method, "teacher_fingerprint": self.fingerprint})
        if "guidance" in self.parts:
            from safetensors.torch import save_file

            guidance = {k: v.detach().float().cpu().contiguous() for k, v in part_state(weights, "guidance").items()}
            save_file(guidance, str(out / GUIDANCE_FILE), metadata={**meta, "module": self.embedding_site})
        (out / RECORD).write_text(json.dumps(record, indent=2))
        return out

    def export(self) -> Path:
        """Write the EMA weights (LoRA file, or a diffusers folder) and the record."""
        return self.write_student(self.ema.state_dict(), self.out, self.record())


def trainer_for(config: DistillConfig, run: Path, out: Path, pipe: Any = None) -> DistillTrainer:
    if config.method == "progressive":
        from effdiff.distill.progressive import ProgressiveTrainer

        return ProgressiveTrainer(config, run, out, pipe)
    if config.method == "rectflow":
        from effdiff.distill.rectflow import RectflowTrainer

        return RectflowTrainer(config, run, out, pipe)
    if config.method == "dmd":
        from effdiff.distill.dmd import DmdTrainer

        return DmdTrainer(config, run, out, pipe)
    return DistillTrainer(config, run, out, pipe)


def distill(config: DistillConfig, run: Path | None = None, out: Path | None = None, resume: bool = False,
            pipe: Any = None) -> Path:
    """Train (or continue) one student; returns the folder it was exported to."""
    out = out or default_output(config.model, student_folder(config.method, config.form))
    run = run or Path("runs") / "distill" / f"{config.model}-{student_folder(config.method, config.form)}"
    return train_and_export(trainer_for(config, run, out, pipe), resume)


def add_distill_arguments(parser) -> None:
    """The flags of ``effdiff distill`` (also ``python -m effdiff.distill.trainer`` on a GPU machine)."""
    parser.add_argument("model", help=f"{', '.join(DISTILLABLE)}, or a local folder of one")
    parser.add_argument("--method", default="lcm", choices=METHODS)
    parser.add_argument("--full", action="store_true", help="train every weight (default: a LoRA)")
    parser.add_argument("--steps", type=int, default=DistillConfig.eval_steps,
                        help="lcm: recorded (it samples any 1-8); progressive: the last round's steps")
    add_config_flags(parser, DistillConfig, ("seed", "iterations", "batch_size", "rank", "checkpoint_every",
                                             "start_steps", "warmup", "couplings", "coupling_steps",
                                             "critic_updates"),
                     ("lr", "guidance", "max_minutes", "w_min", "w_max", "reflow_share", "regression_weight",
                      "critic_lr", "gan_weight", "gan_critic_weight"))
    parser.add_argument("--loss", choices=("l2", "huber"), default=DistillConfig.loss)
    parser.add_argument("--weighting", choices=WEIGHTINGS, default=DistillConfig.weighting,
                        help="guidance-distill: uniform MSE, or each error relative to the teacher's cond − uncond")
    parser.add_argument("--exclude", default=None,
                        help="regex of layer names the LoRA leaves frozen (default: adaln_single on a DiT, none on a "
                             "U-Net; '' trains every layer)")
    add_job_flags(parser, "distill")


def distill_from_arguments(args) -> Path:
    config = config_from_arguments(DistillConfig, args, form="full" if args.full else "lora", eval_steps=args.steps)
    return distill(config, args.run, args.out, args.resume)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m effdiff.distill.trainer")
    add_distill_arguments(parser)
    print(distill_from_arguments(parser.parse_args()))
