"""The one undo log: every change a method makes to a pipeline goes through a ``PatchLog``.

The handle gives each method its own log before ``apply`` and unwinds it after the method's ``remove``,
so no method writes its own undo and ``remove()`` restores the pipeline bit for bit. Every edit keeps
the original object (the very ``forward`` attribute or its absence, ``Parameter``, submodule, class,
attribute) and ``restore`` puts them back in reverse order: weights are never a round trip through a
low precision, and an instance that had no ``forward`` of its own gets none back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

_MISSING = object()
Forward = Callable[..., Any]


def split_name(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(parent module, attribute) of a dotted submodule or tensor name."""
    parent_name, _, attr = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), attr


class Indirection:
    """The forward a patch wraps, reached through a target the core may later swap for a compiled one.

    Under a compiled denoiser the core compiles *beneath* the methods' patches (``adapters/compiled.py``):
    the patch's Python decisions stay eager and what it calls is compiled. The patch is made before the
    core knows which modules end up patched, so it holds this indirection rather than the forward itself.
    """

    def __init__(self, target: Forward) -> None:
        self.target = target

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.target(*args, **kwargs)


class PatchLog:
    """Undo log of one method's edits; ``restore`` replays it backwards and empties it.

    ``indirect``: every ``forward`` patch wraps an ``Indirection`` (listed in ``wrapped``), so the core can
    compile what the patch calls.
    """

    def __init__(self, indirect: bool = False) -> None:
        self._undo: list[Callable[[], None]] = []
        self.indirect = indirect
        self.wrapped: list[tuple[nn.Module, Indirection]] = []

    def __len__(self) -> int:
        return len(self._undo)

    def attr(self, obj: Any, name: str, value: Any) -> Any:
        """Set an instance attribute; restore puts back the previous instance value, or removes it if there was
        none (so a patched bound method falls back to the class's again). Returns the value it replaced."""
        previous = vars(obj).get(name, _MISSING)
        current = getattr(obj, name, None)
        setattr(obj, name, value)
        self._undo.append(lambda: vars(obj).pop(name, None) if previous is _MISSING
                          else setattr(obj, name, previous))
        return current

    def forward(self, module: nn.Module, make: Callable[[Forward], Forward]) -> None:
        """Replace ``module.forward`` on the instance by ``make(current forward)``."""
        inner: Forward = module.forward
        if self.indirect:
            inner = Indirection(inner)
            self.wrapped.append((module, inner))
        self.attr(module, "forward", make(inner))

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

    def hook(self, handle: Any) -> Any:
        """A ``RemovableHandle`` (module hooks) to remove on restore; returned for chaining."""
        self._undo.append(handle.remove)
        return handle

    def call(self, undo: Callable[[], None]) -> None:
        """Any other undo (an unregister function the step context returned, say)."""
        self._undo.append(undo)

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()
        self.wrapped = []
