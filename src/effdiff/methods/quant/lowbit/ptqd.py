"""PTQD: correct a quantized denoiser's output noise, and absorb what is left into a stochastic sampler's noise.

A base quantizer (``ptq`` or ``qdiffusion``, run through its own calibration code) makes the layers; a second
calibration pass then evaluates the full-precision and the quantized denoiser on the *same* inputs at every
denoising step and fits, per timestep, the paper's split of the quantization error (see ``PTQD``).
"""

from __future__ import annotations

import bisect
import inspect
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from effdiff.context import StepContext
from effdiff.methods.cache.base import first_tensor
from effdiff.methods.quant.lowbit.base import QuantMethod
from effdiff.methods.quant.lowbit.observe import calibration_prompts, run_pipeline
from effdiff.methods.quant.lowbit.packed import LayerQuant
from effdiff.methods.quant.lowbit.ptq import PTQ, QDiffusion
from effdiff.patches import PatchLog
from effdiff.registry import Paper, Param, RecipeError

PTQD_PAPER = Paper("PTQD: Accurate Post-Training Quantization for Diffusion Models", "2305.10657", "NeurIPS 2023")
BASES: dict[str, type[QuantMethod]] = {"ptq": PTQ, "qdiffusion": QDiffusion}
# 1 + k divides the output: a degenerate fit (k near -1, e.g. from a constant output) must not blow it up
K_RANGE = (-0.5, 1.0)
Record = tuple[torch.Tensor, torch.Tensor, bool]  # full-precision rows, quantized rows, batched CFG halves


# ---------------------------------------------------------------- the fitted correction


def prediction_channels(model: nn.Module) -> int:
    """Channels of the output that are the prediction: PixArt / DiT also emit learned-sigma channels after them."""
    config = model.config
    inp = config.get("in_channels")
    out = config.get("out_channels") or inp
    return inp if inp and out == 2 * inp else out


def channel_axis(x: torch.Tensor) -> int:
    """Images ``(B, C, H, W)`` carry channels on axis 1, packed token outputs ``(B, N, C)`` (Flux) on the last."""
    return 1 if x.ndim >= 4 else x.ndim - 1


def prediction_rows(x: torch.Tensor, channels: int) -> torch.Tensor:
    """The prediction channels of a denoiser output as ``(batch, channels, everything else)`` float32."""
    moved = x.detach().float().movedim(channel_axis(x), 1)[:, :channels]
    return moved.reshape(moved.shape[0], channels, -1)


@dataclass
class Correction:
    """Per calibrated timestep (ascending): ``k`` (per tensor), ``mu`` (per prediction channel) and the second
    moments of the corrected residual ``[E r_u^2, E r_c^2, E r_u r_c]`` of the unconditional and conditional CFG
    halves (all three equal for unguided calls; a CFG call is taken as one batch, unconditional half first, as
    diffusers pipelines run it). Fitted in the model's own output space (``prediction_type``)."""

    timesteps: list[float]
    k: list[float]
    mu: list[list[float]]
    moments: list[list[float]]
    channels: int
    prediction_type: str

    @classmethod
    def from_info(cls, data: dict[str, Any]) -> Correction:
        return cls(**data)

    def _at(self, values: list[Any], t: float) -> torch.Tensor:
        """Linear in ``t`` between calibrated timesteps, constant beyond the ends (exact at calibrated ones)."""
        table = torch.tensor(values, dtype=torch.float64)
        ts = self.timesteps
        i = bisect.bisect_left(ts, t)
        if i < len(ts) and ts[i] == t:
            return table[i]
        if i == 0 or i == len(ts):
            return table[min(i, len(ts) - 1)]
        w = (t - ts[i - 1]) / (ts[i] - ts[i - 1])
        return table[i - 1] * (1 - w) + table[i] * w

    def k_at(self, t: float) -> float:
        return float(self._at(self.k, t))

    def mu_at(self, t: float) -> torch.Tensor:
        return self._at(self.mu, t)

    def residual_variance(self, t: float, guidance: float | None) -> float:
        """Variance of the corrected residual in the output the sampler receives: the CFG combination
        ``u + w (c - u)`` of the two halves' residuals, or the conditional one alone when unguided."""
        uu, cc, uc = (float(v) for v in self._at(self.moments, t))
        if guidance is None or guidance <= 1.0:
            return cc
        w = guidance
        return max((1 - w) ** 2 * uu + w**2 * cc + 2 * w * (1 - w) * uc, 0.0)

    def apply(self, output: torch.Tensor, t: float) -> torch.Tensor:
        """``(eps_q - mu) / (1 + k)`` on the prediction channels; learned-sigma channels pass through."""
        axis = channel_axis(output)
        shape = [1] * output.ndim
        shape[axis] = self.channels
        mu = self.mu_at(t).to(output.dtype).reshape(shape)
        pred = output.narrow(axis, 0, self.channels)
        corrected = (pred - mu) / (1 + self.k_at(t))
        if output.shape[axis] == self.channels:
            return corrected
        return torch.cat([corrected, output.narrow(axis, self.channels, output.shape[axis] - self.channels)], axis)


def fit_correction(records: dict[float, list[Record]], channels: int, prediction_type: str) -> Correction:
    """Least squares per timestep: ``q - fp = k fp + mu_c + residual`` (one slope, one intercept per channel).

    ``k`` is the paper's correlation coefficient, ``mu`` the mean of its residual (the bias). The moments of the
    corrected residual ``(q - mu) / (1 + k) - fp`` follow from a second sweep over the same records.
    """
    ts = sorted(records)
    ks, mus, moments = [], [], []
    for t in ts:
        n = torch.zeros(channels, dtype=torch.float64)
        sf, sd, sff, sfd = (torch.zeros(channels, dtype=torch.float64) for _ in range(4))
        for fp, q, _ in records[t]:
            f, d = fp.double(), (q - fp).double()
            n += f.shape[0] * f.shape[2]
            sf += f.sum((0, 2))
            sd += d.sum((0, 2))
            sff += (f * f).sum((0, 2))
            sfd += (f * d).sum((0, 2))
        mf, md = sf / n, sd / n
        var_f = float((sff - n * mf * mf).sum())
        cov = float((sfd - n * mf * md).sum())
        k = min(max(cov / var_f, K_RANGE[0]), K_RANGE[1]) if var_f > 0 else 0.0
        mu = md - k * mf
        s_uu = s_cc = s_uc = 0.0
        count = 0
        for fp, q, batched in records[t]:
            r = ((q - fp).double() - mu[None, :, None] - k * fp.double()) / (1 + k)
            if batched:
                u, c = r.chunk(2)
                s_uu, s_cc, s_uc = s_uu + float((u * u).sum()), s_cc + float((c * c).sum()), s_uc + float((u * c).sum())
                count += u.numel()
            else:
                power = float((r * r).sum())
                s_uu, s_cc, s_uc = s_uu + power, s_cc + power, s_uc + power
                count += r.numel()
        ks.append(k)
        mus.append(mu.tolist())
        moments.append([s / max(count, 1) for s in (s_uu, s_cc, s_uc)])
    return Correction(ts, ks, mus, moments, channels, prediction_type)


# ---------------------------------------------------------------- variance schedule calibration


def output_derivatives(prediction_type: str, alpha_prod: float) -> tuple[float, float]:
    """d x0_pred / d output and d eps_pred / d output at fixed ``x_t`` for each prediction type."""
    a, s = math.sqrt(alpha_prod), math.sqrt(1 - alpha_prod)
    if prediction_type == "epsilon":
        return -s / a, 1.0
    if prediction_type == "v_prediction":
        return -s, a
    if prediction_type == "sample":
        return 1.0, -a / s
    raise RecipeError(f"ptqd: prediction type {prediction_type!r} has no variance calibration")


def step_noise(scheduler: Any, t: int, eta: float) -> tuple[float, float]:
    """``(c, v)`` of one DDPM / DDIM step: ``x_prev`` moves by ``c`` per unit of model output and the sampler
    injects Gaussian noise of variance ``v`` (DDPM's ``variance_type`` fixed_small / fixed_large; DDIM's
    ``eta^2 sigma_t^2``)."""
    from diffusers import DDPMScheduler

    acp = scheduler.alphas_cumprod
    alpha_t = float(acp[t])
    d_x0, d_eps = output_derivatives(scheduler.config.prediction_type, alpha_t)
    if isinstance(scheduler, DDPMScheduler):
        prev = int(scheduler.previous_timestep(t))
        alpha_prev = float(acp[prev]) if prev >= 0 else 1.0
        beta = 1 - alpha_t / alpha_prev
        return math.sqrt(alpha_prev) * beta / (1 - alpha_t) * d_x0, float(scheduler._get_variance(t))
    prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_prev = float(acp[prev]) if prev >= 0 else float(scheduler.final_alpha_cumprod)
    var = eta**2 * float(scheduler._get_variance(t, prev))
    return math.sqrt(alpha_prev) * d_x0 + math.sqrt(max(1 - alpha_prev - var, 0.0)) * d_eps, var


def variance_support(scheduler: Any) -> str | None:
    """None where the residual's variance can be absorbed into the injected noise, else why not."""
    from diffusers import DDIMScheduler, DDPMScheduler

    name = type(scheduler).__name__
    if isinstance(scheduler, DDPMScheduler):
        if scheduler.config.variance_type not in ("fixed_small", "fixed_large"):
            return f"not implemented for DDPM variance_type {scheduler.config.variance_type}"
        return None
    if isinstance(scheduler, DDIMScheduler):
        return None
    return (f"inapplicable to {name}: implemented for DDPM and DDIM with eta > 0; a deterministic sampler "
            "(DDIM eta=0, DPM-Solver, UniPC, Euler) injects no noise to reduce, so the residual stays in the output")


# ---------------------------------------------------------------- the method


class PTQD(QuantMethod):
    """PTQD (He et al., arXiv 2305.10657, NeurIPS 2023) on top of a simulated base quantizer.

    The quantized denoiser's error ``delta = out_q - out_fp`` is split into a part correlated with the
    full-precision output and a residual: ``delta = k out_fp + delta'``. Per calibrated timestep, least squares
    over a second calibration pass (full-precision and quantized denoiser run on the same inputs along the
    full-precision trajectory) gives ``k`` (one per tensor) and the residual's mean ``mu`` (one per prediction
    channel). At inference the output becomes ``(out_q - mu) / (1 + k)`` ("correlated noise correction" and
    "bias correction"); timesteps not calibrated interpolate ``k``, ``mu`` and the variances linearly in ``t``.

    Prediction type: the paper writes it for epsilon-prediction; here the fit and the correction are made in the
    space the model predicts (v for the bundled models). With ``x_t`` shared, an error in v is ``1/sqrt(abar)``
    times the error in epsilon, but regressing on ``eps_fp = sqrt(abar) v + sqrt(1 - abar) x_t`` would mix the
    exact input into the regressor; the correlation the paper exploits is with what the network outputs. For
    epsilon models the two coincide. Learned-sigma channels (PixArt / DiT with ``out_channels = 2 in``) are left
    alone.

    Variance schedule calibration (``variance=true``): the corrected residual has variance ``s^2`` per step
    (for CFG, that of the guided combination at the call's guidance, from the halves' second moments). A DDPM
    step moves ``x_prev`` by ``c`` per unit of model output, so the residual adds ``c^2 s^2`` to the noise the
    sampler injects; PTQD injects ``max(v - c^2 s^2, 0)`` instead of ``v`` (DDPM fixed_small / fixed_large; DDIM
    with eta > 0 through its noise, the direction term unchanged). A deterministic sampler (DDIM eta=0,
    DPM-Solver, UniPC, Euler) injects nothing: there the residual's variance cannot be absorbed, and
    ``describe()`` says so. ``c`` assumes no x0 clipping. The paper's step-aware mixed precision is not
    implemented. Simulated, like its base.
    """

    name = "ptqd"
    paper = PTQD_PAPER
    summary = "simulated low-bit PTQ + per-step noise correction (correlated part, bias, sampler variance)"
    params = {
        **QuantMethod.common,
        "wbits": Param(int, 4, choices=QuantMethod.common["wbits"].choices, help="weight bits (16/32: float)"),
        "base": Param(str, "qdiffusion", choices=tuple(BASES), help="quantizer whose calibration makes the layers"),
        "variance": Param(bool, True, help="absorb the residual variance into a DDPM / DDIM(eta>0) sampler's noise"),
    }

    def apply(self, pipe: Any, ctx: StepContext) -> None:
        self._pipe, self._ctx = pipe, ctx
        guidance = inspect.signature(type(pipe).__call__).parameters.get("guidance_scale")
        self._default_guidance = None if guidance is None or guidance.default is inspect.Parameter.empty \
            else guidance.default
        self._guidance = self._default_guidance
        self.absorbed: list[tuple[float, float, float]] = []  # (t, injected variance before, after) of the last call
        self.variance_notes: set[str] = set()
        super().apply(pipe, ctx)
        self.correction = Correction.from_info(self.info["correction"])
        model = self.adapter.model
        self.patches.forward(model, self._corrected)
        self.patches.call(ctx.on_reset(self._new_call))
        if self.values["variance"]:
            self.patches.call(ctx.wrap_step(self._step_filter))

    def prepare_call(self, arguments: dict[str, Any], explicit: frozenset[str]) -> None:
        self._guidance = arguments.get("guidance_scale", self._default_guidance)

    def _settings(self) -> dict[str, Any]:
        return {k: v for k, v in super()._settings().items() if k != "variance"}  # inference-only

    def _load(self, path: str, fingerprint: str) -> tuple[dict[str, LayerQuant], dict[str, Any]]:
        layers, info = super()._load(path, fingerprint)
        if "correction" not in info:
            raise RecipeError(f"ptqd: {path} holds no PTQD correction")
        return layers, info

    # --- calibration ---------------------------------------------------------------------------------
    def calibrate(self, pipe: Any) -> dict[str, LayerQuant]:
        shared = ("wbits", "abits", "prompts", "seed", "steps")
        base = BASES[self.values["base"]](**{k: self.values[k] for k in shared})
        base.adapter, base.ctx = self.adapter, self._ctx  # what QuantMethod.apply gives a method it calibrates
        layers = base.calibrate(pipe)
        self._base_notes = base.calibration_notes()
        self._fitted = self._fit(pipe, layers)
        return layers

    def _fit(self, pipe: Any, layers: dict[str, LayerQuant]) -> Correction:
        """The second pass: full-precision and quantized outputs on the same inputs, at every denoiser call."""
        model = self.adapter.model
        modules = dict(model.named_modules())
        fake = {name: record.layer(modules[name]) for name, record in layers.items()}
        channels = prediction_channels(model)
        records: dict[float, list[Record]] = {}
        swap, outer = PatchLog(), PatchLog()
        inner = model.forward

        def both(*args: Any, **kwargs: Any) -> Any:
            fp = inner(*args, **kwargs)
            for name, layer in fake.items():
                swap.attr(modules[name], "forward", layer)
            try:
                q = inner(*args, **kwargs)
            finally:
                swap.restore()
            out_fp, out_q = first_tensor(fp), first_tensor(q)
            batched = self._ctx.cfg and out_fp.shape[0] % 2 == 0
            key = float(self._ctx.timestep) if self._ctx.timestep is not None else 0.0
            records.setdefault(key, []).append((prediction_rows(out_fp, channels), prediction_rows(out_q, channels),
                                                batched))
            return fp

        outer.attr(model, "forward", both)
        try:
            run_pipeline(pipe, calibration_prompts(pipe, self.values["prompts"]), self.values["seed"],
                         self.values["steps"])
        finally:
            outer.restore()
        if not records:
            raise RecipeError(f"ptqd: the denoiser of {type(pipe).__name__} never ran during calibration")
        prediction_type = str(getattr(pipe.scheduler, "config", {}).get("prediction_type", "unknown"))
        return fit_correction(records, channels, prediction_type)

    def calibration_notes(self) -> dict[str, Any]:
        return {**self._base_notes, "base": self.values["base"], "correction": asdict(self._fitted)}

    # --- inference -----------------------------------------------------------------------------------
    def _new_call(self) -> None:
        self.absorbed = []
        self.variance_notes = set()

    def _corrected(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            out = inner(*args, **kwargs)
            t = self._ctx.timestep
            if t is None:
                return out
            return with_prediction(out, self.correction.apply(first_tensor(out), float(t)))

        return forward

    def _step_filter(self, call_next: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """Run the solver step with the residual variance absorbed into its noise, where the scheduler allows."""
        scheduler = self._pipe.scheduler
        reason = variance_support(scheduler)
        if reason is not None:
            self.variance_notes.add(reason)
            return call_next(*args, **kwargs)
        return self._variance_step(scheduler, call_next)(*args, **kwargs)

    def _variance_step(self, scheduler: Any, inner: Callable[..., Any]) -> Callable[..., Any]:
        from diffusers import DDPMScheduler
        from diffusers.utils.torch_utils import randn_tensor

        signature = inspect.signature(type(scheduler).step)

        def step(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(scheduler, *args, **kwargs)
            arguments = bound.arguments
            t = int(arguments["timestep"])
            eta = float(arguments.get("eta", 0.0))
            ddpm = isinstance(scheduler, DDPMScheduler)
            if not ddpm and eta <= 0:
                self.variance_notes.add("inapplicable: DDIM with eta=0 is deterministic, the residual variance stays "
                                        "in the output")
                return inner(*args, **kwargs)
            if ddpm and t <= 0:
                return inner(*args, **kwargs)  # the last DDPM step injects no noise
            c, v = step_noise(scheduler, t, eta)
            calibrated = max(v - c * c * self.correction.residual_variance(float(t), self._guidance), 0.0)
            self.absorbed.append((float(t), v, calibrated))
            self.variance_notes.add(f"absorbed into {type(scheduler).__name__}'s noise")
            if ddpm:
                # DDPM's step takes no noise argument; it reads the variance from ``_get_variance`` (for this call)
                value = torch.tensor(calibrated, dtype=scheduler.alphas_cumprod.dtype)
                variance = PatchLog()
                variance.attr(scheduler, "_get_variance", lambda *a, **k: value)
                try:
                    return inner(*args, **kwargs)
                finally:
                    variance.restore()
            output = arguments["model_output"]
            noise = arguments.get("variance_noise")
            if noise is None:  # the draw DDIM itself would make, so the random stream is unchanged
                noise = randn_tensor(output.shape, generator=arguments.get("generator"), device=output.device,
                                     dtype=output.dtype)
                arguments["generator"] = None
            arguments["variance_noise"] = noise * math.sqrt(calibrated / v) if v > 0 else noise
            return inner(*bound.args[1:], **bound.kwargs)

        return step

    # --- reporting -----------------------------------------------------------------------------------
    def variance_status(self) -> str:
        if not self.values["variance"]:
            return "off"
        if self.variance_notes:
            text = "; ".join(sorted(self.variance_notes))
            clamped = sum(1 for _, _, after in self.absorbed if after == 0.0)
            if self.absorbed:
                text += f" at {len(self.absorbed)} steps of the last call ({clamped} clamped at 0)"
            return text
        reason = variance_support(self._pipe.scheduler)
        if reason is not None:
            return reason
        return "applies at stochastic steps (DDPM; DDIM only when called with eta > 0, inapplicable at eta=0)"

    def describe(self) -> str:
        text = super().describe()
        correction = getattr(self, "correction", None)
        if correction is None:
            return text
        return (f"{text} [PTQD on {self.values['base']}: {len(correction.timesteps)} calibrated timesteps, "
                f"k (per tensor) {min(correction.k):+.4f}..{max(correction.k):+.4f}, bias per channel, fitted in "
                f"{correction.prediction_type} space; variance calibration: {self.variance_status()}]")


def with_prediction(out: Any, prediction: torch.Tensor) -> Any:
    """``out`` with its first tensor replaced: a tensor, a tuple, or a diffusers ``ModelOutput``."""
    if isinstance(out, torch.Tensor):
        return prediction
    if isinstance(out, tuple):
        return (prediction, *out[1:])
    out[next(iter(out.keys()))] = prediction
    return out
