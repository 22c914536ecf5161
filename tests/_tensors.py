"""Comparing exported weights in the training tests: the one safetensors file of an export, and bit equality."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def exported_tensors(export: Path) -> dict[str, torch.Tensor]:
    files = list(Path(export).rglob("*.safetensors"))
    assert len(files) == 1, files
    return load_file(str(files[0]))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
