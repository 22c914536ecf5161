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
    tuner = "effdiff.tune.teacache"
    examples = {"noop": "teacache:threshold=0", "skips": "teacache:threshold=10,calibration=none"}
    paper = TEACACHE
    summary = "dynamic: skip the denoiser while the accumulated rescaled modulated-input change is small"
    params = {
        "threshold": Param(float, 0.1, 0.0, 100.0, help="skip while the accumulated estimate stays below this",
                           search=(0.02, 1.0)),
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

    def _find_default(self, pipe: Any, fingerprint: str) -> tuple[dict[str, Any] | None, str | None]:
        """The user's own calibration (``effdiff calibrate``) first, then one shipped with a bundled model."""
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
                return record, str(path)
            if name:
                warnings.warn(f"teacache: ignoring {path}: calibrated for other weights (re-run effdiff calibrate)",
                              stacklevel=3)
        shipped = pipe.effdiff_calibration(self.name) if callable(getattr(pipe, "effdiff_calibration", None)) else None
        if shipped is not None and shipped.get("fingerprint") == fingerprint:
            return shipped, f"the calibration shipped with {name}"
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

    @property
    def calibrated(self) -> bool:
        """Whether the rescaling polynomial was fitted (a calibration file, or coefficients given explicitly)."""
        return self.source != "parameters" or "coefficients" in self.given

    def describe(self) -> str:
        coefficients = ",".join(f"{c:.6g}" for c in self.coefficients)
        note = "" if self.calibrated else "; uncalibrated for this model: the threshold acts on the raw input " \
                                          "change (run effdiff calibrate --method teacache)"
        return f"{super().describe()} [using threshold={self.threshold:g}, coefficients={coefficients} " \
               f"from {self.source}{note}]"
