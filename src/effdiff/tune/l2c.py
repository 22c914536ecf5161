"""L2C calibration (``effdiff calibrate --method l2c``): retrain the router and save the largest cached
fraction meeting a PSNR target beside it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from effdiff.adapters import find_denoiser
from effdiff.api import accelerate
from effdiff.eval.fidelity import psnr
from effdiff.methods.cache.l2c import LearningToCache, router_file
from effdiff.methods.solvers.schedule import model_fingerprint
from effdiff.tune.targets import sample_each


def calibrate(pipe: Any, prompts: list[str], steps: int = 50, guidance: float = 4.0, target_psnr: float = 30.0,
              seed: int = 0, path: Path | None = None, period: int = 2, log: Any = print) -> dict[str, Any]:
    """(Re)train the router, print its per-step scores, and save the largest cached fraction meeting a PSNR target.

    Fractions are tried in steps of 0.05 up to the period's limit; the search stops at the first one
    whose images (one per prompt) fall below ``target_psnr`` dB against the baseline's.
    """
    name = getattr(pipe, "effdiff_model_name", None) or model_fingerprint(find_denoiser(pipe))
    path = Path(path) if path else router_file(name, steps, period)
    if path.is_file():
        path.unlink()  # recalibrating retrains
    reference = sample_each(pipe, prompts, steps, guidance, seed)
    settings = {"steps": steps, "period": period, "router": str(path)}
    trainer = LearningToCache(**settings, guidance=guidance, fraction=0.0)
    accelerate(pipe, trainer)
    pipe.effdiff.remove()
    record = trainer.record
    log(f"router trained in {record['train_seconds']:.0f} s ({record['iterations']} iterations, loss "
        f"{record['loss_first']:.5f} -> {record['loss_last']:.5f}) over {len(record['layers'])} layers")
    log(f"{'step':>4}  {'mean score':>10}  {'min score':>9}  {'layers < 0.5':>12}")
    for step, row in enumerate(record["scores"]):
        if row is not None:
            log(f"{step:>4}  {sum(row) / len(row):>10.4f}  {min(row):>9.4f}  {sum(s < 0.5 for s in row):>12}")
    best = {"fraction": 0.0, "psnr": 100.0}
    log(f"{'fraction':>8}  {'PSNR dB':>8}")
    for k in range(1, int((period - 1) / period / 0.05 + 1e-9) + 1):
        fraction = round(0.05 * k, 4)
        accelerate(pipe, LearningToCache(**settings, fraction=fraction))
        try:
            score = psnr(sample_each(pipe, prompts, steps, guidance, seed).clamp(0, 1), reference.clamp(0, 1))
        finally:
            pipe.effdiff.remove()
        log(f"{fraction:>8.2f}  {score:>8.2f}")
        if score < target_psnr:
            break
        best = {"fraction": fraction, "psnr": score}
    record.update(best, target=f"psnr>={target_psnr:g}", calibration_prompts=prompts, path=str(path))
    path.write_text(json.dumps(record, indent=1))
    return record


def run(pipe: Any, model: str, prompts: list[str], steps: int, guidance: float, target_psnr: float, seed: int,
        out: Path | None) -> str:
    """The CLI's entry: train, search the fraction, and say what was chosen in one line."""
    record = calibrate(pipe, prompts, steps=steps, guidance=guidance, target_psnr=target_psnr, seed=seed, path=out)
    return (f"{model}: l2c router trained in {record['train_seconds']:.0f} s; caching {record['fraction']:.0%} "
            f"of layer-steps (PSNR {record['psnr']:.2f} dB) at {steps} steps; wrote {record['path']}")
