"""Reversible in-place edits of a model: swapped tensors, swapped submodules, swapped classes.

Quantization changes what a model *holds* (weights of another dtype, other layers), so unlike the cache
family it cannot get by with patched ``forward`` attributes. Every edit here keeps the original object
(the very ``Parameter``, module or class), and ``restore`` puts those objects back in reverse order: the
model's weights are the originals bit for bit, never a round trip through the low precision.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def split_name(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(parent module, attribute) of a dotted submodule or tensor name."""
    parent_name, _, attr = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), attr


class Swaps:
    """Undo log of one method's edits; ``restore`` replays it backwards."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def __len__(self) -> int:
        return len(self._undo)

    def tensor(self, module: nn.Module, name: str, new: torch.Tensor) -> None:
        """Replace parameter or buffer ``name`` of ``module`` (not a copy into it: the original stays intact)."""
        store = module._parameters if name in module._parameters else module._buffers
        old = store[name]
        store[name] = new
        self._undo.append(lambda: store.__setitem__(name, old))

    def module(self, root: nn.Module, name: str, new: nn.Module) -> nn.Module:
        """Put ``new`` where submodule ``name`` was; returns the original."""
        parent, attr = split_name(root, name)
        old = parent.get_submodule(attr)
        parent.register_module(attr, new)
        self._undo.append(lambda: parent.register_module(attr, old))
        return old

    def klass(self, obj: Any, new: type) -> None:
        old = type(obj)
        obj.__class__ = new
        self._undo.append(lambda: setattr(obj, "__class__", old))

    def hook(self, handle: Any) -> None:
        """A ``RemovableHandle`` (forward hooks) to remove on restore."""
        self._undo.append(handle.remove)

    def call(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()
