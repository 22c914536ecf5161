"""Calling any supported pipeline the same way: text pipelines take prompts, DiTPipeline class labels."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch


def call_parameters(pipe) -> set[str]:
    """Names the pipeline's ``__call__`` accepts (``class_labels`` marks a class-conditional DiT)."""
    return set(inspect.signature(type(pipe).__call__).parameters)


def to_images(out: Any) -> torch.Tensor:
    """Pipeline output (pt tensor or np array, NHWC or NCHW) → float (N, C, H, W) in [0, 1] on CPU."""
    images = out.images if hasattr(out, "images") else out
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
    return images.detach().float().cpu().clamp(0, 1)
