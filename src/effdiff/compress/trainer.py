"""``effdiff compress``: prune a bundled model to a MAC budget, then finetune it — seeded, checkpointed, resumable.

Two methods. ``diffpruning`` (Fang et al., arXiv 2305.10924): Taylor importance over the informative timesteps
(``importance.py``), structural pruning of channels and heads through torch-pruning (``prune.py``);
``--importance magnitude`` is the naive baseline. ``laptop`` (Zhang et al., arXiv 2404.11098): whole layers
removed, those whose removal changes the output least first (``layers.py``), then LAPTOP-Diff's normalized
feature distillation — each block's output matched to the teacher's, the error divided by the teacher feature's
energy so every block counts alike; ``--importance random`` is the baseline. Both prune to ``--macs`` of the
original's MACs per call and then finetune on the denoising loss plus the teacher's output (``--teacher-weight``:
Diff-Pruning finetunes on the plain loss for 100k+ steps; on a 20-minute CPU budget the teacher's output is a
denser signal, as BK-SDM, arXiv 2305.15798, uses it). Captions are dropped 10 % of the time, as the bundled models
were trained, so classifier-free guidance keeps working.

What it writes, beside the model unless ``--out`` says otherwise: ``compress/<method>-macs<M>[-<baseline>]/``
with ``denoiser.safetensors`` (the EMA of the finetuned weights) and ``effdiff_compress.json`` — the layers
removed and the changed widths (``structure.py``), MACs and parameters against the original, how they were
chosen, the teacher and its fingerprint, iterations, wall time and machine.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from effdiff.compress.layers import ORDERS
from effdiff.compress.prune import IMPORTANCES
from effdiff.distill.store import default_output
from effdiff.zoo.train import (
    SteppedTraining,
    add_config_flags,
    add_job_flags,
    caption_of,
    config_from_arguments,
    train_and_export,
)

RECORD = "effdiff_compress.json"
WEIGHTS_FILE = "denoiser.safetensors"
IMPORTANCE_OF = {"diffpruning": IMPORTANCES, "laptop": ORDERS}  # each method's rules, its own first
METHODS = tuple(IMPORTANCE_OF)


def compressed_folder(method: str, macs: float, importance: str) -> str:
    return f"{method}-macs{macs:g}" + ("" if importance == IMPORTANCE_OF[method][0] else f"-{importance}")


@dataclass
class CompressConfig:
    model: str
    method: str = "diffpruning"
    importance: str | None = None  # None: the method's own (taylor, output)
    macs: float = 0.5  # the pruned model's MACs per call, as a fraction of the original's
    seed: int = 0
    iterations: int = 2000
    max_minutes: float | None = 20.0  # the finetuning budget; whichever of it and the iterations ends first
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 50
    ema_decay: float = 0.995
    teacher_weight: float = 1.0  # the teacher's output as a second target (0: the paper's plain loss)
    feature_weight: float = 1.0  # laptop: normalized feature distillation (LAPTOP-Diff)
    caption_dropout: float = 0.1
    threshold: float = 0.05  # Diff-Pruning's informative-timestep rule
    stride: int = 10  # every stride-th timestep is visited for the importance
    checkpoint_every: int = 200
    device: str = "cpu"


def resolved(config: CompressConfig) -> CompressConfig:
    """``config`` with its method's own importance rule where none was given; an unknown method is refused."""
    if config.method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {config.method!r}")
    return config if config.importance is not None else replace(config, importance=IMPORTANCE_OF[config.method][0])


class BlockOutputs:
    """Within ``with``, collects the output feature map of every block of ``model`` (the adapter's blocks, in
    call order); with ``model`` None it collects nothing."""

    def __init__(self, model: torch.nn.Module | None) -> None:
        self.model, self.outputs, self.handles = model, [], []

    def __enter__(self) -> BlockOutputs:
        if self.model is not None:
            from effdiff.adapters import adapter_for

            for ref in adapter_for(self.model).blocks():
                self.handles.append(ref.module.register_forward_hook(
                    lambda _m, _a, out, ref=ref: self.outputs.append(ref.hidden_out(out))))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()


def normalized_feature_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """LAPTOP-Diff's normalized feature distillation: the mean over blocks of ‖f_s − f_t‖² / ‖f_t‖², so a block
    with large activations does not drown the others."""
    terms = [(s - t).pow(2).sum() / t.pow(2).sum().clamp(min=1e-8) for s, t in zip(student, teacher, strict=True)]
    return torch.stack(terms).mean()


class CompressTrainer(SteppedTraining):
    """Prunes on ``prepare`` (or rebuilds the pruned model from a checkpoint on ``resume``), then finetunes."""

    resumable_changes = ("iterations", "max_minutes", "device", "checkpoint_every")

    def __init__(self, config: CompressConfig, run: Path, out: Path, pipe: Any = None) -> None:
        from effdiff.distill.trainer import denoiser_call, teacher_pipeline, training_data
        from effdiff.methods.solvers.schedule import model_fingerprint

        config = resolved(config)
        if config.importance not in IMPORTANCE_OF[config.method]:
            raise ValueError(f"{config.method}: importance must be one of {', '.join(IMPORTANCE_OF[config.method])},"
                             f" got {config.importance!r}")
        if not 0.0 < config.macs < 1.0:
            raise ValueError(f"--macs is a fraction of the original's MACs in (0, 1), got {config.macs}")
        self.config, self.run_dir, self.out = config, Path(run), Path(out)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(config.device)
        torch.manual_seed(config.seed)
        self.gen = torch.Generator().manual_seed(config.seed)
        self.pipe = pipe if pipe is not None else teacher_pipeline(config.model, "compress")
        self.is_dit = self.pipe.denoiser_name == "transformer"
        self.teacher = self.pipe.denoiser.to(self.device).eval().requires_grad_(False)
        self.fingerprint = model_fingerprint(self.teacher)
        self.call = lambda model: denoiser_call(model, self.is_dit)
        self.images, self.labels, self.per_digit, self.uncond = training_data(self.device)
        self.alphas_cumprod = self.pipe.scheduler.alphas_cumprod.float()
        self.prediction_type = self.pipe.scheduler.config.prediction_type
        self.student: torch.nn.Module | None = None
        self.removed: list[str] = []
        self.step, self.elapsed, self.losses = 0, 0.0, []

    # ---------------------------------------------------------------- pruning

    def prepare(self) -> None:
        """Importance, then pruning to the MAC budget; the pruned model is what finetuning starts from."""
        started = time.perf_counter()
        pruned = self._prune_depth() if self.config.method == "laptop" else self._prune_width()
        self.elapsed += time.perf_counter() - started
        self._start(pruned)

    def _prune_width(self) -> torch.nn.Module:
        from effdiff.compress.importance import accumulate_taylor_gradients
        from effdiff.compress.prune import prune_to_macs
        from effdiff.compress.structure import changed_widths

        c = self.config
        model = copy.deepcopy(self.teacher)
        images, text = self._batch(dropout=0.0)
        self.timesteps = (accumulate_taylor_gradients(model, self.call(model), images, text, self.alphas_cumprod,
                                                      self.prediction_type, c.threshold, c.stride, self.gen)
                          if c.importance == "taylor" else [])
        pruned, self.facts = prune_to_macs(model, c.macs, c.importance)
        self.widths = changed_widths(self.teacher, pruned)
        return pruned

    def _prune_depth(self) -> torch.nn.Module:
        from effdiff.adapters import adapter_for
        from effdiff.compress.layers import layers_for_budget, output_loss_scores, removal_order

        c = self.config
        model = copy.deepcopy(self.teacher)
        candidates = [name for name, _ in adapter_for(model).removable_layers()]
        images, text = self._batch(dropout=0.0)
        scores = (output_loss_scores(model, self.call(model), candidates, images, text, self.alphas_cumprod,
                                     generator=self.gen)
                  if c.importance == "output" else dict.fromkeys(candidates, 0.0))
        self.removed, self.facts = layers_for_budget(model, removal_order(scores, c.importance, c.seed), c.macs)
        self.facts["scores"] = scores
        self.timesteps, self.widths = [], {}
        return self.rebuild({})

    def _start(self, student: torch.nn.Module) -> None:
        self.student = student.requires_grad_(True).train()
        self.ema = copy.deepcopy(self.student).requires_grad_(False).eval()
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=self.config.lr, weight_decay=0.0)

    def rebuild(self, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
        """The pruned model from its weights, ``self.removed`` and ``self.widths``: a copy of the teacher, its
        layers removed and reshaped in place."""
        from effdiff.compress.structure import put_structure, remove_layers
        from effdiff.patches import PatchLog

        model = copy.deepcopy(self.teacher)
        log = PatchLog()  # thrown away: the copy stays pruned
        remove_layers(log, model, self.removed)
        put_structure(log, model, weights, self.widths)
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model

    # ---------------------------------------------------------------- checkpoints

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        state = {"student": self.student.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                 "widths": self.widths, "removed": self.removed, "facts": self.facts, "timesteps": self.timesteps,
                 "step": self.step, "elapsed": self.elapsed, "losses": self.losses, "gen": self.gen.get_state(),
                 "torch_rng": torch.get_rng_state(), "config": asdict(self.config)}
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.checkpoint_path)

    def resume(self) -> None:
        if not self.checkpoint_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {self.checkpoint_path}")
        state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=False)
        differs = {k: (v, getattr(self.config, k, None)) for k, v in state["config"].items()
                   if k not in self.resumable_changes and getattr(self.config, k, None) != v}
        if differs:
            raise ValueError(f"--resume: the checkpoint was made with other settings (saved, now): {differs}")
        self.widths, self.facts, self.timesteps = state["widths"], state["facts"], state["timesteps"]
        self.removed = state["removed"]
        self._start(self.rebuild(state["student"]))
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.step, self.elapsed, self.losses = state["step"], state["elapsed"], state["losses"]
        self.gen.set_state(state["gen"].cpu())
        torch.set_rng_state(state["torch_rng"].cpu())

    # ---------------------------------------------------------------- finetuning

    def _batch(self, dropout: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        idx = torch.randint(0, len(self.images), (c.batch_size,), generator=self.gen).to(self.device)
        text = caption_of(self.labels[idx], self.per_digit, self.gen)
        drop = (torch.rand(c.batch_size, generator=self.gen) < (c.caption_dropout if dropout is None
                                                                   else dropout)).to(self.device)
        return self.images[idx], torch.where(drop[:, None, None], self.uncond.expand_as(text), text)

    def loop_settings(self) -> tuple[int, float, int, int, float | None]:
        c = self.config
        return c.iterations, c.lr, c.warmup, c.checkpoint_every, c.max_minutes

    def step_loss(self) -> torch.Tensor:
        images, text = self._batch()
        timesteps = torch.randint(0, len(self.alphas_cumprod), (len(images),), generator=self.gen).to(self.device)
        noise = torch.randn(images.shape, generator=self.gen).to(self.device)
        alpha = self.alphas_cumprod.to(self.device)[timesteps][:, None, None, None]
        noisy = alpha.sqrt() * images + (1 - alpha).sqrt() * noise
        target = {"v_prediction": alpha.sqrt() * noise - (1 - alpha).sqrt() * images, "epsilon": noise,
                  "sample": images}[self.prediction_type]
        c = self.config
        features = c.feature_weight and self.removed
        with BlockOutputs(self.student if features else None) as student_features:
            output = self.call(self.student)(noisy, timesteps, text)
        loss = (output - target).pow(2).mean()
        if c.teacher_weight or features:
            with torch.no_grad(), BlockOutputs(self.teacher if features else None) as teacher_features:
                taught = self.call(self.teacher)(noisy, timesteps, text)
            loss = loss + c.teacher_weight * (output - taught).pow(2).mean()
        if features:
            loss = loss + c.feature_weight * normalized_feature_loss(student_features.outputs,
                                                                     teacher_features.outputs)
        return loss

    def after_step(self) -> None:
        decay = min(self.config.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.student.parameters(), strict=True):
                e.lerp_(p, 1 - decay)

    def train(self) -> None:
        if self.student is None:
            self.prepare()
        c = self.config
        self.run_steps(f"compress {c.model} {c.method} macs={c.macs:g} ({c.importance})")

    # ---------------------------------------------------------------- export

    def record(self) -> dict[str, Any]:
        from effdiff.distill.trainer import machine

        c = self.config
        return {"method": c.method, "importance": c.importance, "macs_target": c.macs, **self.facts,
                "informative_timesteps": self.timesteps, "removed": self.removed, "widths": self.widths,
                "teacher": c.model,
                "teacher_fingerprint": self.fingerprint, "config": asdict(c), "iterations_done": self.step,
                "wall_seconds": round(self.elapsed, 1), "machine": machine(self.device),
                "data": "4,000 training digits (effdiff.zoo.data) with their captions, the teacher's outputs",
                "final_loss_avg100": sum(self.losses[-100:]) / max(1, len(self.losses[-100:])),
                "when": time.strftime("%Y-%m-%d %H:%M:%S")}

    def export(self) -> Path:
        from safetensors.torch import save_file

        self.out.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().cpu().contiguous() for k, v in self.ema.state_dict().items()}
        save_file(weights, str(self.out / WEIGHTS_FILE),
                  metadata={"teacher": self.config.model, "teacher_fingerprint": self.fingerprint})
        (self.out / RECORD).write_text(json.dumps(self.record(), indent=2))
        return self.out


def compress(config: CompressConfig, run: Path | None = None, out: Path | None = None, resume: bool = False,
             pipe: Any = None) -> Path:
    """Prune and finetune (or continue) one compressed model; returns the folder it was exported to."""
    config = resolved(config)
    name = compressed_folder(config.method, config.macs, config.importance)
    out = out or default_output(config.model, name, "compress")
    run = run or Path("runs") / "compress" / f"{config.model}-{name}"
    return train_and_export(CompressTrainer(config, run, out, pipe), resume)


def add_compress_arguments(parser) -> None:
    """The flags of ``effdiff compress`` (also ``python -m effdiff.compress.trainer`` on a GPU machine)."""
    from effdiff.distill.trainer import DISTILLABLE

    parser.add_argument("model", help=f"{', '.join(DISTILLABLE)}, or a local folder of one")
    parser.add_argument("--method", default="diffpruning", choices=METHODS)
    parser.add_argument("--importance", default=None, choices=sorted({i for v in IMPORTANCE_OF.values() for i in v}),
                        help="diffpruning: taylor (default) or magnitude (the naive baseline); laptop: output "
                             "(default) or random")
    parser.add_argument("--macs", type=float, default=CompressConfig.macs,
                        help="the pruned model's MACs per call as a fraction of the original's, in (0, 1)")
    add_config_flags(parser, CompressConfig, ("seed", "iterations", "batch_size", "warmup", "stride",
                                              "checkpoint_every"),
                     ("lr", "max_minutes", "teacher_weight", "feature_weight", "threshold"))
    add_job_flags(parser, "compress")


def compress_from_arguments(args) -> Path:
    config = config_from_arguments(CompressConfig, args)
    return compress(config, args.run, args.out, args.resume)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m effdiff.compress.trainer")
    add_compress_arguments(parser)
    print(compress_from_arguments(parser.parse_args()))
