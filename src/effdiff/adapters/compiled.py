"""Compiled denoisers: recognise both ways users compile, and move compilation below effdiff's patches.

Users compile a denoiser in place (``pipe.unet.compile()``, which sets ``_compiled_call_impl``) or replace
it (``pipe.unet = torch.compile(pipe.unet)``, an ``OptimizedModule`` around ``_orig_mod``). A cache's
per-step decisions are Python state (which step, which branch, skip or not); traced inside a whole-model
graph they become guards, and every new step value recompiles until dynamo's recompile limit (what
``fbcache`` hit on the compiled SD 1.5 U-Net). One wrapper function patched onto many layers is worse
still: dynamo guards on its closure, so every layer is one more entry of the same code object.

So when a recipe holds such a method, the core compiles *regionally, beneath the patches*: the whole-model
compilation is switched off (through the undo log); every patched module whose subtree holds no other patch
gets its original ``forward`` compiled under the patch (``PatchLog(indirect=True)`` leaves the hook for it);
every block with no patch in it is compiled whole. The decisions run eagerly between compiled regions,
each region compiles once per input shape, and ``remove()`` restores the user's compiled model as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from effdiff.patches import PatchLog

Compiler = Callable[[Callable[..., Any]], Callable[..., Any]]


def optimized_module_class() -> type | None:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # a torch without dynamo
        return None
    return OptimizedModule


def unwrap(module: nn.Module) -> nn.Module:
    """The module itself, or the one a ``torch.compile(module)`` wrapper holds."""
    cls = optimized_module_class()
    return module._orig_mod if cls is not None and isinstance(module, cls) else module  # type: ignore[return-value]


def how_compiled(module: nn.Module) -> str | None:
    """``"wrapped"`` (``torch.compile(module)``), ``"in place"`` (``module.compile()``) or ``None``."""
    if unwrap(module) is not module:
        return "wrapped"
    return "in place" if getattr(module, "_compiled_call_impl", None) is not None else None


def block_compiler(module: nn.Module) -> Compiler:
    """Compile blocks with the user's own settings (backend, mode, options): a wrapper keeps its dynamo context
    as ``dynamo_ctx``; an in-place compilation holds it in the closure of ``_compiled_call_impl``. Where
    neither can be read (another torch), the blocks get ``torch.compile``'s defaults."""
    if unwrap(module) is not module:
        ctx = getattr(module, "dynamo_ctx", None)
    else:
        impl = getattr(module, "_compiled_call_impl", None)
        ctx = next((c.cell_contents for c in getattr(impl, "__closure__", None) or ()
                    if _is_dynamo_context(c.cell_contents)), None)
    return ctx if ctx is not None else torch.compile


def _is_dynamo_context(value: Any) -> bool:
    try:
        from torch._dynamo.eval_frame import _TorchDynamoContext
    except ImportError:
        return False
    return isinstance(value, _TorchDynamoContext)


def decompile(pipe: Any, attr: str, log: PatchLog) -> None:
    """Switch off a whole-denoiser compilation at ``pipe.<attr>`` (undone by ``log``)."""
    module = getattr(pipe, attr)
    how = how_compiled(module)
    if how == "wrapped":
        log.attr(pipe, attr, unwrap(module))
    elif how == "in place":
        log.attr(module, "_compiled_call_impl", None)


def compile_regions(model: nn.Module, blocks: list[nn.Module], logs: list[PatchLog], compiler: Compiler,
                    log: PatchLog) -> int:
    """Compile beneath the innermost patches of ``logs`` (made with ``indirect=True``, in application order)
    and every block without a patch; returns how many regions were compiled."""
    names = {id(m): n for n, m in model.named_modules()}
    first: dict[int, Any] = {}
    for method_log in logs:
        for module, indirection in method_log.wrapped:
            first.setdefault(id(module), indirection)  # the earliest patch wraps the module's own forward
    ancestors: set[str] = set()
    for key in first:
        parts = names.get(key, "").split(".")
        ancestors.update(".".join(parts[:i]) for i in range(len(parts)))
    regions = 0
    for key, indirection in first.items():
        if names.get(key) not in ancestors:
            original = indirection.target
            indirection.target = compiler(original)
            log.call(lambda ind=indirection, fn=original: setattr(ind, "target", fn))
            regions += 1
    for block in blocks:
        name = names.get(id(block))
        if id(block) not in first and name not in ancestors:
            log.forward(block, compiler)
            regions += 1
    return regions
