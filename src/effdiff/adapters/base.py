"""The uniform structural view of a denoiser that methods program against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

# How a block is called and what it returns (after cache-dit's "forward patterns"):
#   "unet_down": (hidden, temb, ...) -> (hidden, tuple of skip features)
#   "unet_mid":  (hidden, temb, ...) -> hidden
#   "unet_up":   (hidden, res_hidden_states_tuple, temb, ...) -> hidden
#   "hidden":    (hidden, ...) -> hidden                         (DiT, PixArt)
#   "joint":     (hidden, encoder_hidden, ...) -> (encoder_hidden, hidden)   (SD3, Flux)
PATTERNS = ("unet_down", "unet_mid", "unet_up", "hidden", "joint")


@dataclass
class BlockRef:
    """One block, where it lives (so it can be wrapped or swapped) and how it is called."""

    name: str
    module: nn.Module
    parent: nn.Module
    key: int | str
    role: str
    pattern: str

    def replace(self, new: nn.Module) -> nn.Module:
        """Put ``new`` where the block was; returns the old module (keep it to restore)."""
        old = self.get()
        if isinstance(self.key, int):
            self.parent[self.key] = new
        else:
            setattr(self.parent, self.key, new)
        self.module = new
        return old

    def get(self) -> nn.Module:
        return self.parent[self.key] if isinstance(self.key, int) else getattr(self.parent, self.key)


class Adapter:
    """Base adapter: attention and linear discovery is generic; blocks are per architecture."""

    kind: ClassVar[str] = ""
    model_class: ClassVar[str] = ""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        import diffusers

        target = getattr(diffusers, cls.model_class, None)
        return target is not None and isinstance(model, target)

    def blocks(self) -> list[BlockRef]:
        raise NotImplementedError

    def skips(self) -> list[tuple[int, int]]:
        """(index of producing block, index of consuming block) in ``blocks()``; empty for DiTs."""
        return []

    def attention(self) -> list[tuple[str, nn.Module]]:
        """Every diffusers attention module (``Attention`` or an ``AttentionModuleMixin``), by name."""
        from diffusers.models.attention import AttentionModuleMixin
        from diffusers.models.attention_processor import Attention

        kinds = (Attention, AttentionModuleMixin)
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, kinds)]

    def linears(self) -> list[tuple[str, nn.Linear]]:
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, nn.Linear)]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> str:
        blocks = self.blocks()
        return (f"{type(self.model).__name__} ({self.kind}): {len(blocks)} blocks, "
                f"{len(self.attention())} attention modules, {len(self.linears())} linear layers")

    @staticmethod
    def _list(model: nn.Module, attr: str, role: str, pattern: str) -> list[BlockRef]:
        container: Any = getattr(model, attr, None)
        if container is None:
            return []
        return [BlockRef(f"{attr}.{i}", block, container, i, role, pattern)
                for i, block in enumerate(container)]
