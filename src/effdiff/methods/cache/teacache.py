"""TeaCache: skip the whole denoiser while its timestep-modulated input barely changes.

The calibration (``effdiff calibrate --method teacache``) fits the rescaling polynomial and picks the
threshold for a quality target; it is saved per model next to the other effdiff caches and picked up
by ``teacache`` when neither ``coefficients`` nor ``threshold`` is given.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from effdiff.adapters import Streams, find_denoiser
from effdiff.context import StepContext
from effdiff.methods.cache.base import FBCACHE, refuse, relative_l1
from effdiff.methods.cache.segment import SegmentCache
from effdiff.methods.solvers.schedule import cache_path, model_fingerprint
from effdiff.registry import Paper, Param, RecipeError

TEACACHE = Paper("Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model", FBCACHE.arxiv,
                 "CVPR 2025")
NO_CALIBRATION = ("none", "off")


def calibration_file(model_name: str) -> Path:
    """Where ``effdiff calibrate`` saves the TeaCache calibration of ``model_name``."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name.strip("/").replace("/", "--"))
    return cache_path().parent / f"teacache-{safe}.json"


def parse_coefficients(text: str) -> list[float]:
    """``"c0,c1,..."`` (ascending powers; ``|`` or ``;`` also separate, as a recipe splits on ``,``) -> floats.

    ``""`` is the identity ``[0, 1]``.
    """
    if not text.strip():
        return [0.0, 1.0]
    try:
        values = [float(part) for part in text.replace(";", ",").replace("|", ",").split(",") if part.strip()]
    except ValueError:
        raise RecipeError(f"teacache: coefficients must be comma-separated numbers c0,c1,..., got {text!r}") from None
    if not values or len(values) > 10 or any(v != v or abs(v) == float("inf") for v in values):
        raise RecipeError(f"teacache: coefficients must be 1 to 10 finite numbers c0,c1,..., got {text!r}")
    return values


def rescale(coefficients: list[float], x: float) -> float:
    """``sum_i c_i x^i`` (Horner)."""
    out = 0.0
    for c in reversed(coefficients):
        out = out * x + c
    return out


class TeaCache(SegmentCache):
    """Skip all blocks while the accumulated, rescaled change of the timestep-modulated input stays small.

    Paper: Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model"
    (arXiv 2411.19108, CVPR 2025). At every denoiser call the relative L1 change of the first block's
    timestep-modulated input (PixArt: its adaLN-single normalised and modulated hidden states; DiT: its
    adaLN-zero output; FLUX/SD3: the image stream through the first joint block's adaLN-zero, as the
    authors' FLUX code reads it; U-Net: the first resnet's normalised input plus its time-embedding projection)
    against the previous call is mapped to an estimate of the output change by the polynomial
    ``sum_i c_i x^i`` (``coefficients``, fitted by ``effdiff calibrate``) and accumulated. While the sum
    stays below ``threshold`` the blocks are skipped and the residual of the whole block span (DiT: last
    block output minus first block input; U-Net: last up block output minus ``conv_in`` output), cached
    at the last full step, is added to the current input; otherwise everything runs, the residual is
    refreshed and the sum reset. The first ``warmup`` steps and the last step always run, as in the
    paper's code. ``threshold=0`` never skips: bit-identical to the baseline. With neither
    ``coefficients`` nor ``threshold`` given, the model's saved calibration (if any) supplies both.
    """

    name = "teacache"
    examples = {"noop": "teacache:threshold=0", "skips": "teacache:threshold=10,calibration=none"}
    paper = TEACACHE
    summary = "dynamic: skip the denoiser while the accumulated rescaled modulated-input change is small"
    params = {
        "threshold": Param(float, 0.1, 0.0, 100.0, help="skip while the accumulated estimate stays below this"),
        "warmup": Param(int, 1, 0, 10000, help="first steps always computed"),
        "coefficients": Param(str, "", help="rescaling polynomial c0,c1,... in ascending powers, default 0,1 "
                                            "(in a recipe string separate them with '|': coefficients=0|1)"),
        "calibration": Param(str, "", help="calibration JSON (default: the model's file from `effdiff calibrate`; "
                                           "'none' to ignore it)"),
    }

    def __init__(self, **values: Any) -> None:
        super().__init__(**values)
        self.coefficients = parse_coefficients(self.values["coefficients"])
        self.threshold = self.values["threshold"]
        self.source = "parameters"
        self.recording = False
        self.changes: list[float] = []
        self.trace: list[tuple[int, float, float]] = []

    # --- calibration file ---------------------------------------------------------------------------
    def setup(self, pipe: Any) -> None:
        self._load_calibration(pipe)
        super().setup(pipe)

    def _load_calibration(self, pipe: Any) -> None:
        given = self.values["calibration"].strip()
        if given.lower() in NO_CALIBRATION or {"coefficients", "threshold"} <= self.given:
            return
        fingerprint = model_fingerprint(find_denoiser(pipe))
        if given:
            path = Path(given).expanduser()
            if not path.is_file():
                raise refuse(self.name, f"calibration file {given} not found")
            record = self._read(path)
            if record.get("fingerprint") != fingerprint:
                warnings.warn(f"teacache: {path} was calibrated for another model (fingerprint "
                              f"{record.get('fingerprint')} != {fingerprint})", stacklevel=2)
        else:
            record, path = self._find_default(pipe, fingerprint)
            if record is None:
                return
        if "coefficients" not in self.given:
            self.coefficients = [float(c) for c in record["coefficients"]]
        if "threshold" not in self.given:
            self.threshold = float(record["threshold"])
        self.source = str(path)

    def _read(self, path: Path) -> dict[str, Any]:
        try:
            record = json.loads(path.read_text())
            [float(c) for c in record["coefficients"]]
            float(record["threshold"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise refuse(self.name, f"calibration file {path} is not a TeaCache calibration ({exc})") from None
        return record

    def _find_default(self, pipe: Any, fingerprint: str) -> tuple[dict[str, Any] | None, Path | None]:
        name = getattr(pipe, "effdiff_model_name", None)
        candidates = [calibration_file(name)] if name else sorted(cache_path().parent.glob("teacache-*.json"))
        for path in candidates:
            if not path.is_file():
                continue
            try:
                record = self._read(path)
            except RecipeError:
                continue
            if record.get("fingerprint") == fingerprint:
                return record, path
            if name:
                warnings.warn(f"teacache: ignoring {path}: calibrated for other weights (re-run effdiff calibrate)",
                              stacklevel=3)
        return None, None

    # --- the segment: every block -------------------------------------------------------------------
    def segment(self, state: dict[str, Any], ctx: StepContext) -> tuple[int, int]:
        return self.unet_segment(0) if self.unet else (0, len(self.refs))

    def _block(self, i: int, inner: Any) -> Any:
        forward = super()._block(i, inner)
        if i != 0:
            return forward

        def first(*args: Any, **kwargs: Any) -> Any:
            self.current["fwd"]["call"] = (args, kwargs)
            return forward(*args, **kwargs)

        return first

    def _modulated(self, forward: dict[str, Any]) -> torch.Tensor:
        args, kwargs = forward["call"]
        with torch.no_grad():
            return self.adapter.modulated_input(self.refs[0], args, kwargs)

    def skip(self, state: dict[str, Any], ctx: StepContext, forward: dict[str, Any]) -> bool:
        modulated = self._modulated(forward)
        previous = state.get("modulated")
        state["modulated"] = modulated
        change = relative_l1(modulated, previous) if previous is not None else float("inf")
        forward["change"] = change
        self.changes.append(change)
        forced = (previous is None or ctx.step_index < self.values["warmup"] or "feature" not in state
                  or (ctx.total_steps > 0 and ctx.is_last_step))
        if not forced and self.threshold > 0:
            state["acc"] = state.get("acc", 0.0) + rescale(self.coefficients, change)
            if state["acc"] < self.threshold:
                return True
        state["acc"] = 0.0
        return False

    def store(self, state: dict[str, Any], ctx: StepContext, feature: Streams) -> None:
        super().store(state, ctx, feature)
        if self.recording:
            forward = state["fwd"]
            out = (forward["entry"] + feature if state["residual"] else feature).hidden
            previous = state.get("exit")
            if previous is not None and forward["change"] != float("inf"):
                self.trace.append((ctx.step_index, forward["change"], relative_l1(out, previous)))
            state["exit"] = out

    def _reset(self) -> None:
        super()._reset()
        self.changes = []
        self.trace = []

    def describe(self) -> str:
        coefficients = ",".join(f"{c:.6g}" for c in self.coefficients)
        return f"{super().describe()} [using threshold={self.threshold:g}, coefficients={coefficients} " \
               f"from {self.source}]"


# --- calibration (``effdiff calibrate --method teacache``) ------------------------------------------------
def parse_target(text: str) -> tuple[str, float]:
    """``"psnr>=30"`` -> ``("psnr", 30.0)``; anything else is a ValueError saying what is accepted."""
    import re

    match = re.fullmatch(r"\s*([a-z]+)\s*(>=|<=)\s*([0-9]*\.?[0-9]+)\s*", text.lower())
    if not match:
        raise ValueError(f"--target must look like psnr>=30, got {text!r}")
    metric, op, value = match.group(1), match.group(2), float(match.group(3))
    if metric == "fid":
        raise ValueError("--target fid<=X is not supported yet; use psnr>=X (dB vs the baseline images)")
    if metric != "psnr" or op != ">=":
        raise ValueError(f"--target must be psnr>=X (dB vs the baseline images), got {text!r}")
    return metric, value


def _sample(pipe: Any, prompts: list[str], steps: int, guidance: float, seed: int) -> torch.Tensor:
    """One call per prompt (batch-1 latency, as served), same noise per prompt index."""
    from effdiff.methods.solvers.schedule import _run

    return torch.cat([_run(pipe, [prompt], steps, guidance, seed + i) for i, prompt in enumerate(prompts)])


def calibrate(pipe: Any, prompts: list[str], steps: int = 50, guidance: float = 4.0, target_psnr: float = 30.0,
              seed: int = 0, degree: int = 4, thresholds: list[float] | None = None,
              log: Any = print) -> dict[str, Any]:
    """Fit TeaCache's rescaling polynomial on the baseline and pick the largest threshold meeting a PSNR target.

    The baseline runs with ``teacache:threshold=0`` (bit-identical to no method) recording per step the
    relative L1 change of the modulated input and of the block span's output; ``numpy.polyfit`` maps the
    first to the second. Thresholds on a geometric grid are then tried in increasing order; the search
    stops at the first one whose images fall below ``target_psnr`` dB against the baseline's.
    """
    import numpy as np

    import effdiff
    from effdiff.eval.fidelity import psnr

    recorder = TeaCache(threshold=0.0, calibration="none")
    effdiff.accelerate(pipe, recorder)
    recorder.recording = True
    baseline, trace = [], []
    try:
        for i, prompt in enumerate(prompts):
            baseline.append(_sample(pipe, [prompt], steps, guidance, seed + i))
            trace.extend(recorder.trace)
    finally:
        pipe.effdiff.remove()
    reference = torch.cat(baseline)
    if len(trace) < 2:
        raise ValueError(f"calibration needs more steps than {steps} to observe changes")
    by_step: dict[int, list[tuple[float, float]]] = {}
    for step, x, y in trace:
        by_step.setdefault(step, []).append((x, y))
    log(f"{'step':>4}  {'rel. input change':>17}  {'rel. output change':>18}")
    for step in sorted(by_step):
        xs, ys = zip(*by_step[step], strict=True)
        log(f"{step:>4}  {sum(xs) / len(xs):>17.5f}  {sum(ys) / len(ys):>18.5f}")
    x = np.array([t[1] for t in trace])
    y = np.array([t[2] for t in trace])
    deg = max(1, min(degree, len(trace) - 1))
    coefficients = [float(c) for c in np.polyfit(x, y, deg)[::-1]]  # ascending powers
    fitted = np.polyval(coefficients[::-1], x)
    log(f"fit (degree {deg}): coefficients {', '.join(f'{c:.6g}' for c in coefficients)}; "
        f"mean |fit - output change| {float(np.abs(fitted - y).mean()):.5f}")

    grid = thresholds or [float(t) for t in np.geomspace(0.01, 4.0, 16)]
    best: dict[str, Any] = {"threshold": 0.0, "psnr": 100.0, "cached_fraction": 0.0}
    log(f"{'threshold':>9}  {'PSNR dB':>8}  {'cached':>6}")
    for threshold in sorted(grid):
        method = TeaCache(threshold=threshold, coefficients=",".join(repr(c) for c in coefficients),
                          calibration="none")
        effdiff.accelerate(pipe, method)
        try:
            images, cached, calls = [], 0, 0
            for i, prompt in enumerate(prompts):
                images.append(_sample(pipe, [prompt], steps, guidance, seed + i))
                cached, calls = cached + method.stats.cached, calls + method.stats.calls
        finally:
            pipe.effdiff.remove()
        score = psnr(torch.cat(images).clamp(0, 1), reference.clamp(0, 1))
        fraction = cached / calls if calls else 0.0
        log(f"{threshold:>9.4f}  {score:>8.2f}  {fraction:>6.1%}")
        if score < target_psnr:
            break
        best = {"threshold": threshold, "psnr": score, "cached_fraction": fraction}
        if cached >= calls - 2 * len(prompts):  # all but the always-run first and last steps
            break
    return {"method": "teacache", "coefficients": coefficients, "threshold": best["threshold"],
            "target": f"psnr>={target_psnr:g}", "psnr": best["psnr"], "cached_fraction": best["cached_fraction"],
            "fingerprint": model_fingerprint(find_denoiser(pipe)), "steps": steps, "guidance": guidance,
            "prompts": prompts, "degree": deg}
