"""``effdiff compress``: prune a bundled model to a MAC budget, then finetune it — seeded, checkpointed, resumable.

Four methods. ``diffpruning`` (Fang et al., arXiv 2305.10924): Taylor importance over the informative timesteps
(``importance.py``), structural pruning of channels and heads through torch-pruning (``prune.py``);
``--importance magnitude`` is the naive baseline. ``laptop`` (Zhang et al., arXiv 2404.11098): whole layers
removed, those whose removal changes the output least first (``layers.py``), then LAPTOP-Diff's normalized
feature distillation — each block's output matched to the teacher's, the error divided by the teacher feature's
energy so every block counts alike; ``--importance random`` is the baseline. ``bksdm`` (Kim et al., arXiv
2305.15798): BK-SDM's hand-chosen U-Net blocks removed (``--variant base|small|tiny``, ``Adapter.block_removal``),
then its distillation — the stage outputs matched to the teacher's (plain MSE). ``ditprune`` (TinyFusion, Fang
et al., arXiv 2412.01199): N of every M DiT blocks kept by a mask learned with a LoRA (``depth.py``; ``--importance
random`` is the baseline), heads and widths pruned further if the budget asks, then TinyFusion's masked feature
distillation. diffpruning, laptop and ditprune prune to ``--macs`` of the original's MACs per call; all finetune
on the denoising loss plus the teacher's output (``--teacher-weight``: Diff-Pruning finetunes on the plain loss for
100k+ steps; on a 20-minute CPU budget the teacher's output is a denser signal, as BK-SDM uses it), and a
feature loss (``--feature-weight``; diffpruning's: every block's output matched to the teacher's channels it kept,
which torch-pruning reports as it prunes — each pruned layer starts as exactly that slice of the teacher's), and
the teacher's *guided* output (``--guidance-weight``, default 1; 0 = off): every sample is seen without and with
its caption and the student's ``uncond + w·(cond − uncond)`` is matched to the teacher's, relative to the size of
the teacher's guidance direction (``_guided_loss`` says why; on tiny-sd it took the pruned model's FID from 1.99 to
1.49 at the same 20 minutes). With it off, captions are dropped 10 % of the time, as the bundled models were
trained, so classifier-free guidance keeps working.

What it writes, beside the model unless ``--out`` says otherwise: ``compress/<method>-macs<M>[-<baseline>]/``
(``bksdm-<variant>/``) with ``denoiser.safetensors`` (the EMA of the finetuned weights) and
``effdiff_compress.json`` — the layers and blocks removed and the changed widths (``structure.py``), MACs and
parameters against the original, how they were chosen, the teacher and its fingerprint, iterations, wall time and
machine.
"""

from __future__ import annotations

import copy
import functools
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from effdiff.compress.depth import DEPTH_IMPORTANCES
from effdiff.compress.layers import ORDERS
from effdiff.compress.prune import ALLOCATIONS, IMPORTANCES
from effdiff.distill.guidance import relative_error
from effdiff.distill.store import default_output
from effdiff.distill.teacher import combine_guidance, prediction_target
from effdiff.zoo.ranges import refuse_out_of_range
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
# each method's rules for what to remove, its own first (bksdm's blocks are chosen by hand, by variant)
IMPORTANCE_OF = {"diffpruning": IMPORTANCES, "laptop": ORDERS, "bksdm": ("handpicked",),
                 "ditprune": DEPTH_IMPORTANCES}
METHODS = tuple(IMPORTANCE_OF)
VARIANTS = ("base", "small", "tiny")  # BK-SDM's
# ditprune: a block pattern whose MACs exceed the target by at most this share of the original's meets it (the
# embeddings and output layer, which no pattern removes, put 1:2 of a DiT just above one half); the alternative,
# pruning a whole head more for that sliver, costs far more quality than it saves
DEPTH_TOLERANCE = 0.01
# the guided-output loss's scales, drawn uniformly: the range the bundled models are sampled at (the bench's is 4)
GUIDED_SCALES = (2.0, 6.0)


def compressed_folder(method: str, macs: float, importance: str, variant: str = "small",
                      allocation: str = "uniform") -> str:
    if method == "bksdm":
        return f"bksdm-{variant}"
    return (f"{method}-macs{macs:g}" + ("" if importance == IMPORTANCE_OF[method][0] else f"-{importance}")
            + ("" if allocation == "uniform" else f"-{allocation}"))


def recipe_of(record: dict[str, Any], folder: Path | None = None) -> str:
    """The recipe that applies the compressed model a record describes (from ``folder`` when given)."""
    values = ([f"variant={record['variant']}"] if record["method"] == "bksdm"
              else [f"macs={record['macs_target']:g}", f"importance={record['importance']}"])
    allocation = record.get("config", {}).get("allocation", "uniform")  # records before it was a choice: uniform
    values += [] if allocation == "uniform" else [f"allocation={allocation}"]
    return f"{record['method']}:" + ",".join(values + ([f"path={folder}"] if folder is not None else []))


@dataclass
class CompressConfig:
    model: str
    method: str = "diffpruning"
    importance: str | None = None  # None: the method's own (taylor, output)
    allocation: str = "uniform"  # diffpruning: every layer group loses the same share, or a global ranking
    macs: float = 0.5  # the pruned model's MACs per call, as a fraction of the original's
    variant: str = "small"  # bksdm: which of BK-SDM's models (base, small, tiny)
    pattern: str = "1:2"  # ditprune: keep N of every M consecutive blocks (TinyFusion's local groups)
    mask_iterations: int = 300  # ditprune: iterations learning the mask (with LoRA), before finetuning
    seed: int = 0
    iterations: int = 2000
    max_minutes: float | None = 20.0  # the finetuning budget; whichever of it and the iterations ends first
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 50
    ema_decay: float = 0.995
    teacher_weight: float = 1.0  # the teacher's output as a second target (0: the paper's plain loss)
    feature_weight: float = 1.0  # laptop and diffpruning: normalized feature distillation (LAPTOP-Diff's loss)
    guidance_weight: float = 1.0  # the teacher's guided output (both halves of each sample), relative to cond − uncond
    caption_dropout: float = 0.1  # without the guided loss only (with it, every sample is seen both ways)
    threshold: float = 0.05  # Diff-Pruning's informative-timestep rule
    stride: int = 10  # every stride-th timestep is visited for the importance
    checkpoint_every: int = 200
    device: str = "cpu"
    bf16: bool = False  # bf16 autocast around the loss (SteppedTraining.autocast)


def resolved(config: CompressConfig) -> CompressConfig:
    """``config`` with its method's own importance rule where none was given; an unknown method is refused."""
    if config.method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {config.method!r}")
    return config if config.importance is not None else replace(config, importance=IMPORTANCE_OF[config.method][0])


def first_tensor(out: Any) -> torch.Tensor:
    """A layer's output feature map: the tensor itself, a tuple's first, or a diffusers output's ``sample``."""
    if isinstance(out, torch.Tensor):
        return out
    return out[0] if isinstance(out, tuple) else out.sample


class FeatureTaps:
    """Within ``with``, collects the output feature map of each of ``layers`` (module, how to read its output),
    in call order; with no layers it collects nothing."""

    def __init__(self, layers: list[tuple[torch.nn.Module, Any]]) -> None:
        self.layers, self.outputs, self.handles = layers, [], []

    @classmethod
    def blocks(cls, model: torch.nn.Module) -> FeatureTaps:
        """Every block of ``model`` (the adapter's, each read as its hidden stream)."""
        from effdiff.adapters import adapter_for

        return cls([(ref.module, ref.hidden_out) for ref in adapter_for(model).blocks()])

    @classmethod
    def named(cls, model: torch.nn.Module, names: list[str]) -> FeatureTaps:
        return cls([(model.get_submodule(name), first_tensor) for name in names])

    def __enter__(self) -> FeatureTaps:
        for module, read in self.layers:
            self.handles.append(module.register_forward_hook(
                lambda _m, _a, out, read=read: self.outputs.append(read(out))))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()


def normalized_feature_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """LAPTOP-Diff's normalized feature distillation: the mean over blocks of ‖f_s − f_t‖² / ‖f_t‖², so a block
    with large activations does not drown the others."""
    terms = [(s - t).pow(2).sum() / t.pow(2).sum().clamp(min=1e-8) for s, t in zip(student, teacher, strict=True)]
    return torch.stack(terms).mean()


def feature_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """BK-SDM's feature distillation: the sum over stages of the mean squared difference."""
    return torch.stack([(s - t).pow(2).mean() for s, t in zip(student, teacher, strict=True)]).sum()


def kept_channel_feature_loss(student: list[torch.Tensor], teacher: list[torch.Tensor],
                              kept: list[torch.Tensor | None]) -> torch.Tensor:
    """Feature distillation for a channel-pruned model: each block's output matched to the teacher's channels the
    block kept (``kept``: their indices, None where it kept all), normalized as LAPTOP-Diff's loss is."""
    def selected(t: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        return t if index is None else t.index_select(1 if t.ndim == 4 else t.ndim - 1, index.to(t.device))

    chosen = [selected(t, index) for t, index in zip(teacher, kept, strict=True)]
    for s, t in zip(student, chosen, strict=True):
        if s.shape != t.shape:
            raise ValueError(f"a pruned block's output {tuple(s.shape)} does not match the teacher's kept channels "
                             f"{tuple(t.shape)}: the adapter's block_output_layer names the wrong layer")
    return normalized_feature_loss(student, chosen)


def masked_feature_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """TinyFusion's masked distillation: features farther than 2 standard deviations from their mean (per
    example; a DiT's few massive activations) are left out of each side before matching; normalised by the
    teacher's kept energy, as LAPTOP-Diff's loss is, so one weight serves every method."""
    def typical(h: torch.Tensor) -> torch.Tensor:
        flat = h.flatten(1)
        mean, std = flat.mean(1, keepdim=True), flat.std(1, keepdim=True)
        return (flat * ((flat - mean).abs() < 2 * std)).view_as(h)

    terms = [(typical(s) - typical(t)).pow(2).sum() / typical(t).pow(2).sum().clamp(min=1e-8)
             for s, t in zip(student, teacher, strict=True)]
    return torch.stack(terms).mean()


FEATURE_LOSS_WORDS = {
    normalized_feature_loss: "every block's output, normalized (LAPTOP-Diff)",
    feature_loss: "each stage's output, plain MSE (BK-SDM)",
    masked_feature_loss: "each group's last block output, masked (TinyFusion)",
    kept_channel_feature_loss: "every block's output on the teacher's kept channels, normalized",
}


class CompressTrainer(SteppedTraining):
    """Prunes on ``prepare`` (or rebuilds the pruned model from a checkpoint on ``resume``), then finetunes."""

    resumable_changes = ("iterations", "max_minutes", "device", "checkpoint_every")

    def __init__(self, config: CompressConfig, run: Path, out: Path, pipe: Any = None) -> None:
        from effdiff.distill.trainer import denoiser_call, teacher_pipeline, training_data
        from effdiff.methods.solvers.schedule import model_fingerprint

        config = resolved(config)
        refuse_out_of_range(config)
        if config.importance not in IMPORTANCE_OF[config.method]:
            raise ValueError(f"{config.method}: importance must be one of {', '.join(IMPORTANCE_OF[config.method])},"
                             f" got {config.importance!r}")
        if not 0.0 < config.macs < 1.0:
            raise ValueError(f"--macs is a fraction of the original's MACs in (0, 1), got {config.macs}")
        if config.allocation != "uniform" and config.method != "diffpruning":
            raise ValueError(f"--allocation is diffpruning's (channel pruning); {config.method} removes whole layers")
        if config.variant not in VARIANTS:
            raise ValueError(f"--variant is one of {', '.join(VARIANTS)}, got {config.variant!r}")
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
        self.blocks: dict[str, Any] = {}  # a BlockPlan (bksdm, ditprune)
        self.facts: dict[str, Any] = {}
        self.widths: dict[str, Any] = {}
        self.kept_channels: dict[str, list[int]] = {}  # diffpruning: each pruned layer's original channels kept
        self.step, self.elapsed, self.losses = 0, 0.0, []

    # ---------------------------------------------------------------- pruning

    def prepare(self) -> None:
        """Importance, then pruning to the MAC budget; the pruned model is what finetuning starts from."""
        started = time.perf_counter()
        prune = {"diffpruning": self._prune_width, "laptop": self._prune_layers, "bksdm": self._prune_blocks,
                 "ditprune": self._prune_dit_depth}[self.config.method]
        pruned = prune()
        self.elapsed += time.perf_counter() - started
        self._start(pruned)

    def _prune_width(self, start: torch.nn.Module | None = None, importance: str | None = None) -> torch.nn.Module:
        """Channels and heads pruned from ``start`` (the teacher by default) until a call has ``--macs`` of the
        teacher's MACs."""
        from effdiff.compress.importance import accumulate_taylor_gradients
        from effdiff.compress.prune import call_macs, prune_to_macs
        from effdiff.compress.structure import changed_widths

        c = self.config
        importance = importance or c.importance
        start = start if start is not None else self.teacher
        model = copy.deepcopy(start)
        images, text = self._batch(dropout=0.0)
        self.timesteps = (accumulate_taylor_gradients(model, self.call(model), images, text, self.alphas_cumprod,
                                                      self.prediction_type, c.threshold, c.stride, self.gen)
                          if importance == "taylor" else [])
        share = c.macs * self.teacher_macs / call_macs(start)
        pruned, facts = prune_to_macs(model, share, importance, allocation=c.allocation)
        self.kept_channels = facts["kept_channels"]
        self.facts.update(ratio=facts["ratio"], **self._fractions(pruned))
        self.widths = changed_widths(start, pruned)
        return pruned

    @functools.cached_property
    def teacher_macs(self) -> float:
        """MACs of one teacher call (counted once: every budget and fraction is relative to it)."""
        from effdiff.compress.prune import call_macs

        return call_macs(self.teacher)

    def _fractions(self, model: torch.nn.Module) -> dict[str, float]:
        from effdiff.compress.prune import call_macs

        def params(m: torch.nn.Module) -> int:
            return sum(p.numel() for p in m.parameters())

        return {"macs_fraction": call_macs(model) / self.teacher_macs,
                "params_fraction": params(model) / params(self.teacher)}

    def _prune_blocks(self) -> torch.nn.Module:
        """BK-SDM: the variant's stages and pairs removed; the rest keeps the teacher's weights."""
        from effdiff.adapters import adapter_for

        plan = adapter_for(self.teacher).block_removal(self.config.variant)
        self.blocks, self.timesteps = asdict(plan), []
        model = self.rebuild({})
        self.facts = {"variant": self.config.variant, **self._fractions(model)}
        return model

    def _prune_dit_depth(self) -> torch.nn.Module:
        """TinyFusion: keep N of every M blocks by a learned (or random) mask; then, if a call still costs more
        than ``--macs``, prune heads and feed-forward widths (Diff-Pruning's Taylor importance) to it."""
        from effdiff.adapters import adapter_for
        from effdiff.compress.depth import learn_kept_blocks, parse_pattern, random_kept
        from effdiff.compress.structure import BlockPlan

        c = self.config
        names = [ref.name for ref in adapter_for(self.teacher).blocks()]
        lists = {name.rpartition(".")[0] for name in names}
        if len(lists) != 1 or not all(name.rpartition(".")[2].isdigit() for name in names):
            raise ValueError(f"ditprune removes blocks of one transformer block list; {type(self.teacher).__name__}"
                             " is not built that way (for a U-Net use bksdm or laptop)")
        container = lists.pop()
        keep, group = parse_pattern(c.pattern, len(names))
        if c.importance == "learned":
            kept, self.facts = learn_kept_blocks(self.teacher, container, c.pattern, self._masked_loss,
                                                 c.mask_iterations, c.batch_size, self.gen)
        else:
            kept = random_kept(len(names), keep, group, c.seed)
            self.facts = {"pattern": c.pattern, "kept": kept}
        ends = [max(i for i in kept if i // group == g) for g in range(len(names) // group)]
        plan = BlockPlan(kept={container: kept},
                         features=[(f"{container}.{g * group + group - 1}", f"{container}.{kept.index(end)}")
                                   for g, end in enumerate(ends)])
        self.blocks, self.timesteps = asdict(plan), []
        model = self.rebuild({})
        self.facts.update(self._fractions(model))
        if self.facts["macs_fraction"] > c.macs + DEPTH_TOLERANCE:
            model = self._prune_width(model, "taylor")
        return model

    def _masked_loss(self, model: torch.nn.Module) -> torch.Tensor:
        noisy, timesteps, text, target = self._noised()
        return (self.call(model)(noisy, timesteps, text) - target).pow(2).mean()

    def _prune_layers(self) -> torch.nn.Module:
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
        from effdiff.compress.structure import BlockPlan, apply_block_plan, put_structure, remove_layers
        from effdiff.patches import PatchLog

        model = copy.deepcopy(self.teacher)
        log = PatchLog()  # thrown away: the copy stays pruned
        remove_layers(log, model, self.removed)
        apply_block_plan(log, model, BlockPlan.of(self.blocks))
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
                 "widths": self.widths, "removed": self.removed, "blocks": self.blocks, "facts": self.facts,
                 "timesteps": self.timesteps, "kept_channels": self.kept_channels,
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
        self.removed, self.blocks = state["removed"], state["blocks"]
        self.kept_channels = state.get("kept_channels", {})  # checkpoints before 2026-12-07: no feature matching
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

    def _noised(self, dropout: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A training batch noised to random timesteps: (noisy, timesteps, text, the denoising target)."""
        images, text = self._batch(dropout)
        timesteps = torch.randint(0, len(self.alphas_cumprod), (len(images),), generator=self.gen).to(self.device)
        noise = torch.randn(images.shape, generator=self.gen).to(self.device)
        alpha = self.alphas_cumprod.to(self.device)[timesteps][:, None, None, None]
        noisy = alpha.sqrt() * images + (1 - alpha).sqrt() * noise
        return noisy, timesteps, text, prediction_target(images, noise, alpha, self.prediction_type)

    def _feature_taps(self) -> tuple[FeatureTaps, FeatureTaps, Any] | None:
        """(student taps, teacher taps, loss) of the method's feature distillation; None without one: LAPTOP-Diff's
        every block, normalized; BK-SDM's stage outputs, plain; TinyFusion's group outputs, masked; a
        channel-pruned model's every block, on the teacher's channels it kept, normalized."""
        if not self.config.feature_weight:
            return None
        if self.removed:
            return FeatureTaps.blocks(self.student), FeatureTaps.blocks(self.teacher), normalized_feature_loss
        pairs = self.blocks.get("features")
        if not pairs and self.kept_channels:
            return (FeatureTaps.blocks(self.student), FeatureTaps.blocks(self.teacher),
                    functools.partial(kept_channel_feature_loss, kept=self._kept_per_block))
        if not pairs:
            return None
        loss = masked_feature_loss if self.config.method == "ditprune" else feature_loss
        return (FeatureTaps.named(self.student, [s for _, s in pairs]),
                FeatureTaps.named(self.teacher, [t for t, _ in pairs]), loss)

    @functools.cached_property
    def _kept_per_block(self) -> list[torch.Tensor | None]:
        """For each of the teacher's blocks, the indices of its output channels the pruned model kept (None: all)."""
        from effdiff.adapters import adapter_for

        adapter = adapter_for(self.teacher)
        layers = [adapter.block_output_layer(ref) for ref in adapter.blocks()]
        return [torch.tensor(self.kept_channels[layer]) if layer in self.kept_channels else None for layer in layers]

    def _paired(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``_noised``'s batch twice over, without and with its captions (none dropped): the two halves of
        classifier-free guidance at the same noisy inputs."""
        noisy, timesteps, text, target = self._noised(dropout=0.0)
        noisy, timesteps, target = (torch.cat([a, a]) for a in (noisy, timesteps, target))
        return noisy, timesteps, torch.cat([self.uncond.expand_as(text), text]), target

    def _guided_loss(self, output: torch.Tensor, taught: torch.Tensor) -> torch.Tensor:
        """The student's guided output against the teacher's at a scale drawn per sample from ``GUIDED_SCALES``,
        each sample's error relative to the teacher's ``cond − uncond`` there (``relative_error``). Why: sampling
        uses ``uncond + w·(cond − uncond)``, and below t ≈ 800 that direction is 10–50× smaller than the outputs, so
        the plain losses leave it unlearned — the pruned tiny-sd's direction had a relative error above 1 there
        (its guidance nearly noise) while its conditional output was within 1 %."""
        (student_uncond, student_cond), (teacher_uncond, teacher_cond) = output.chunk(2), taught.chunk(2)
        low, high = GUIDED_SCALES
        scale = (low + (high - low) * torch.rand(len(student_cond), generator=self.gen)).to(output.device)
        return relative_error(combine_guidance(student_uncond, student_cond, scale),
                              combine_guidance(teacher_uncond, teacher_cond, scale), teacher_cond - teacher_uncond)

    def step_loss(self) -> torch.Tensor:
        c = self.config
        noisy, timesteps, text, target = self._paired() if c.guidance_weight else self._noised()
        taps = self._feature_taps()
        student_taps, teacher_taps = (taps[0], taps[1]) if taps else (FeatureTaps([]), FeatureTaps([]))
        with student_taps:
            output = self.call(self.student)(noisy, timesteps, text)
        loss = (output - target).pow(2).mean()
        if c.teacher_weight or c.guidance_weight or taps:
            with torch.no_grad(), teacher_taps:
                taught = self.call(self.teacher)(noisy, timesteps, text)
            loss = loss + c.teacher_weight * (output - taught).pow(2).mean()
        if taps:
            loss = loss + c.feature_weight * taps[2](student_taps.outputs, teacher_taps.outputs)
        if c.guidance_weight:
            loss = loss + c.guidance_weight * self._guided_loss(output, taught)
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
        what = f"variant={c.variant}" if c.method == "bksdm" else f"macs={c.macs:g} ({c.importance})"
        self.run_steps(f"compress {c.model} {c.method} {what}")

    # ---------------------------------------------------------------- export

    def record(self) -> dict[str, Any]:
        from effdiff.distill.trainer import machine

        c = self.config
        return {"method": c.method, "importance": c.importance, "macs_target": c.macs, **self.facts,
                "informative_timesteps": self.timesteps, "removed": self.removed, "blocks": self.blocks,
                "widths": self.widths, "feature_distillation": self._feature_distillation(),
                "teacher": c.model,
                "teacher_fingerprint": self.fingerprint, "config": asdict(c), "iterations_done": self.step,
                "wall_seconds": round(self.elapsed, 1), "machine": machine(self.device),
                "data": "4,000 training digits (effdiff.zoo.data) with their captions, the teacher's outputs",
                "final_loss_avg100": sum(self.losses[-100:]) / max(1, len(self.losses[-100:])),
                "when": time.strftime("%Y-%m-%d %H:%M:%S")}

    def _feature_distillation(self) -> str | None:
        """What the finetune's feature loss matched, in words, for the record (None: no feature loss); read off the
        loss ``_feature_taps`` chooses, so the record cannot disagree with the training."""
        taps = self._feature_taps()
        if taps is None:
            return None
        return FEATURE_LOSS_WORDS[getattr(taps[2], "func", taps[2])]

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
    name = compressed_folder(config.method, config.macs, config.importance, config.variant, config.allocation)
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
                             "(default) or random; ditprune: learned (default) or random")
    parser.add_argument("--allocation", default=CompressConfig.allocation, choices=ALLOCATIONS,
                        help="diffpruning: uniform (every layer group loses the same share, the authors' setting) or "
                             "global (channels ranked across layers)")
    parser.add_argument("--macs", type=float, default=CompressConfig.macs,
                        help="the pruned model's MACs per call as a fraction of the original's, in (0, 1)")
    parser.add_argument("--variant", default=CompressConfig.variant, choices=VARIANTS,
                        help="bksdm: which of BK-SDM's block removals")
    parser.add_argument("--pattern", default=CompressConfig.pattern,
                        help="ditprune: keep N of every M consecutive blocks (N:M)")
    add_config_flags(parser, CompressConfig, ("seed", "iterations", "batch_size", "warmup", "stride",
                                              "checkpoint_every", "mask_iterations"),
                     ("lr", "max_minutes", "teacher_weight", "feature_weight", "guidance_weight", "threshold"))
    add_job_flags(parser, "compress")


def compress_from_arguments(args) -> Path:
    config = config_from_arguments(CompressConfig, args)
    return compress(config, args.run, args.out, args.resume)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m effdiff.compress.trainer")
    add_compress_arguments(parser)
    print(compress_from_arguments(parser.parse_args()))
