"""The cheap measurements a tuning trial is scored on: a few samples against the baseline, in this process.

Why the bench's own functions: a trial's speed-up is the bench's paired, alternating timing of the recipe against
the baseline on the same batch (``measure_cost``), and its images come from the bench's caller with fixed
per-sample seeds, so a proxy number and the confirmation's number describe the same computation. The proxy
samples use seeds far from the bench's (``PROXY_SEED``): the search never sees the images it is confirmed on.
"""

from __future__ import annotations

from typing import Any

import torch

from effdiff.bench.runner import Caller, RecipeSwitch, make_config, measure_cost, quality_samples
from effdiff.eval.fidelity import fidelity

PROXY_SEED = 1_000_000


class ProxyJudge:
    """Measures recipes on ``samples`` images (seeds from ``PROXY_SEED``) against the baseline computed once;
    with ``distribution`` also FID/KID against the held-out digits (the refinement stage's few hundred samples:
    enough to rank stacks, with the baseline scored on the same seeds beside them; too few to hold a bound)."""

    def __init__(self, pipe: Any, samples: int, steps: int, guidance: float, timing_batch: int = 2,
                 reps: int = 3, accelerate_fn: Any = None, seed: int = PROXY_SEED, distribution: bool = False) -> None:
        if accelerate_fn is None:
            from effdiff.api import accelerate as accelerate_fn
        self.pipe, self.accelerate_fn = pipe, accelerate_fn
        self.config = make_config(["tune"], [], samples, steps, guidance, list(range(seed, seed + samples)),
                                  quick=False, timing_batch=timing_batch, reps=reps)
        self.caller = Caller(pipe, self.config)
        self.device = str(getattr(pipe, "device", "cpu"))
        self.speed_only = bool(getattr(pipe, "effdiff_speed_only", False))
        self.baseline, self.baseline_flops = quality_samples(self.caller, RecipeSwitch(pipe, "", accelerate_fn),
                                                             self.config)
        self._classifier = None
        self.baseline_accuracy = self._accuracy(self.baseline)
        self._judge = None
        self.baseline_distribution = self._distribution(self.baseline) if distribution else {}

    def _distribution(self, images: torch.Tensor) -> dict[str, float]:
        """FID and KID of ``images`` against the held-out digits."""
        if self._judge is None:
            from effdiff.eval.distribution import DistributionJudge

            self._judge = DistributionJudge.bundled()
        scores = self._judge.score(images)
        return {"fid": scores["fid"], "kid": scores["kid"]}

    def _accuracy(self, images: torch.Tensor) -> float | None:
        """Share of samples the bundled digit classifier reads as the asked digit (None for a speed-only twin)."""
        if self.speed_only:
            return None
        from effdiff.eval.accuracy import predict_digits

        if self._classifier is None:
            from effdiff.eval.distribution import DistributionJudge

            self._classifier = DistributionJudge.bundled().features.classifier
        digits = torch.as_tensor(self.caller.digits)
        return float((predict_digits(images, self._classifier) == digits).float().mean())

    def measure(self, recipe: str, timed: bool = True) -> dict[str, Any]:
        """Speed-up (paired timing; skipped when not ``timed``), FLOPs ratio, PSNR/SSIM vs the baseline,
        accuracy and (with ``distribution``) FID/KID of ``recipe``, with the baseline's beside them.

        Raises RecipeError when a method refuses this pipeline (a missing checkpoint, a kernel the CPU lacks).
        """
        switch = RecipeSwitch(self.pipe, recipe, self.accelerate_fn)
        cost = measure_cost(self.pipe, self.caller, switch, self.config, self.device) if timed else {}
        images, flops = quality_samples(self.caller, switch, self.config) if recipe else (
            self.baseline, self.baseline_flops)
        quality = fidelity(images, self.baseline)
        distribution: dict[str, float] = {}
        if self.baseline_distribution:
            distribution = {**self._distribution(images),
                            **{f"baseline_{k}": v for k, v in self.baseline_distribution.items()}}
        return {
            **distribution,
            "speedup": cost.get("speedup"), "flops_ratio": self.baseline_flops / flops if flops else float("nan"),
            "nfe": cost.get("nfe"), "time_per_image_s": cost.get("time_per_image_s"),
            "baseline_time_per_image_s": cost.get("baseline_time_per_image_s"), "labels": cost.get("labels", []),
            "psnr": min(quality["psnr"], 100.0), "ssim": quality["ssim"],
            "prompt_accuracy": self._accuracy(images), "baseline_prompt_accuracy": self.baseline_accuracy,
        }
