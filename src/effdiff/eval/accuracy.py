"""Prompt accuracy: does the bundled classifier read the digit that the prompt asked for?"""

from __future__ import annotations

import torch


@torch.no_grad()
def predict_digits(images01: torch.Tensor, classifier: torch.nn.Module, batch: int = 256) -> torch.Tensor:
    """Classifier argmax for images in [0, 1] (the classifier itself expects [-1, 1])."""
    preds = [classifier(chunk.float() * 2 - 1).argmax(1) for chunk in images01.split(batch)]
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def prompt_accuracy(
    images01: torch.Tensor, digits: torch.Tensor | list[int], classifier: torch.nn.Module
) -> float:
    """Fraction of images classified as the digit asked for."""
    asked = torch.as_tensor(digits, dtype=torch.long)
    if len(asked) != len(images01):
        raise ValueError(f"{len(images01)} images but {len(asked)} requested digits")
    if len(asked) == 0:
        raise ValueError("prompt accuracy of zero images is undefined")
    return float((predict_digits(images01, classifier) == asked).float().mean())
