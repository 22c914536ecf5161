"""Record a denoiser's calls during a pipeline run, to replay them later with other inputs.

Calibrations that need the denoiser itself rather than whole pipeline calls (EfficientDM's distillation targets,
TFMQ's timestep features, Align Your Steps' KL bound) record one full-precision run and call the model again
with the recorded conditioning: the pipeline's own prompt encoding, guidance batching and extra inputs, with no
knowledge of which pipeline made them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from effdiff.context import timestep_of


@dataclass
class Call:
    """One denoiser call of the recorded run: its inputs and its output (the target)."""

    args: tuple
    kwargs: dict[str, Any]
    target: torch.Tensor
    timestep: float

    def sample(self) -> torch.Tensor:
        """The noisy input (the U-Net's first positional ``sample``, a transformer's ``hidden_states``)."""
        return self.args[0] if self.args else self.kwargs.get("hidden_states", self.kwargs.get("sample"))

    def replay(self, model: nn.Module, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """The model's output on ``sample`` at per-row ``timestep``, conditioned as in this call.

        ``sample`` may hold several copies of the recorded batch stacked along the batch dimension (copy ``k``
        at rows ``k*B .. k*B+B-1``); every recorded tensor whose first dimension is the batch is tiled to match.
        """
        batch = self.target.shape[0]
        copies = sample.shape[0] // batch

        def tile(t: torch.Tensor) -> torch.Tensor:
            return t.repeat(copies, *([1] * (t.ndim - 1))) if t.ndim and t.shape[0] == batch else t

        args, kwargs = tree_map(self.args, tile), tree_map(self.kwargs, tile)
        if args:
            args = (sample, timestep, *args[2:]) if len(args) > 1 else (sample,)
        else:
            kwargs["hidden_states" if "hidden_states" in kwargs else "sample"] = sample
        if len(self.args) <= 1:
            kwargs["timestep"] = timestep
        return first_tensor(model(*args, **kwargs))


def first_tensor(out: Any) -> torch.Tensor:
    """The prediction of a denoiser's output (a tensor, a tuple or a diffusers ``ModelOutput``)."""
    return out if isinstance(out, torch.Tensor) else out[0]


def tree_map(obj: Any, fn: Any) -> Any:
    """``fn`` on every tensor inside nested tuples / lists / dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(tree_map(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: tree_map(v, fn) for k, v in obj.items()}
    return obj


class Trajectory:
    """Records every call of the denoiser while active (inputs cloned, output as the distillation target).

    ``last_only`` keeps just the latest call: a 100-step run of a large model would otherwise hold 100 copies
    of its latents and text states.
    """

    def __init__(self, model: nn.Module, last_only: bool = False) -> None:
        self.model = model
        self.last_only = last_only
        self.calls: list[Call] = []
        self._pending: tuple[tuple, dict[str, Any]] | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> Trajectory:
        def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._pending = tree_map(args, lambda t: t.detach().clone()), tree_map(kwargs, lambda t: t.detach().clone())

        def after(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            assert self._pending is not None
            saved_args, saved_kwargs = self._pending
            t = timestep_of(saved_args, saved_kwargs)
            call = Call(saved_args, saved_kwargs, first_tensor(out).detach().clone(), 0.0 if t is None else t)
            if self.last_only:
                self.calls.clear()
            self.calls.append(call)

        self._handles = [self.model.register_forward_pre_hook(before, with_kwargs=True),
                         self.model.register_forward_hook(after, with_kwargs=True)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def timesteps(self) -> list[float]:
        """Distinct timesteps in the order first seen."""
        return list(dict.fromkeys(c.timestep for c in self.calls))
