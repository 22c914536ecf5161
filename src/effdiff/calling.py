"""Calling any supported pipeline the same way: text pipelines take prompts, DiTPipeline class labels.

The one place that knows it: methods that calibrate (quantizers, AYS, L2C), the tuners and the bench all
call a pipeline with N conditions through ``conditions_for`` and ``call_with``. A pipeline that knows its
own prompts (the bundled digit models) offers them with ``effdiff_prompts(purpose, n)``, so no method
imports the zoo.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch


def call_parameters(pipe) -> set[str]:
    """Names the pipeline's ``__call__`` accepts (``class_labels`` marks a class-conditional DiT)."""
    return set(inspect.signature(type(pipe).__call__).parameters)


GENERIC_PROMPTS = (
    "a photo of a cat", "a red car on a street", "a bowl of fruit on a table", "a mountain lake at sunrise",
    "a portrait of an old man", "a city skyline at night", "a dog running on a beach", "a bunch of flowers",
)


def is_class_conditional(pipe: Any) -> bool:
    params = call_parameters(pipe)
    return "class_labels" in params and "prompt" not in params


def conditions_for(pipe: Any, n: int, purpose: str = "calibration") -> list[Any]:
    """``n`` conditions: class labels for a class-conditional pipeline, the pipeline's own prompts where it
    offers them (``purpose`` "calibration" keeps them apart from its "eval" prompts), generic ones otherwise."""
    if is_class_conditional(pipe):
        return [i % 1000 for i in range(n)]
    own = getattr(pipe, "effdiff_prompts", None)
    if callable(own):
        return list(own(purpose, n))
    return [GENERIC_PROMPTS[i % len(GENERIC_PROMPTS)] for i in range(n)]


def call_with(pipe: Any, conditions: list[Any], **kwargs: Any) -> Any:
    """``pipe(conditions, **kwargs)`` with prompts, or class labels for a class-conditional pipeline (text
    conditions become labels 0..n-1 there). PixArt-style pipelines bin sizes to their aspect-ratio table,
    which refuses models whose sample size is not in it, so the binning is turned off."""
    if "use_resolution_binning" in call_parameters(pipe):
        kwargs.setdefault("use_resolution_binning", False)
    if is_class_conditional(pipe):
        labels = [c if isinstance(c, int) else i for i, c in enumerate(conditions)]
        return pipe(class_labels=labels, **kwargs)
    return pipe(list(conditions), **kwargs)


def to_images(out: Any) -> torch.Tensor:
    """Pipeline output (pt tensor or np array, NHWC or NCHW) → float (N, C, H, W) in [0, 1] on CPU."""
    images = out.images if hasattr(out, "images") else out
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
    return images.detach().float().cpu().clamp(0, 1)
