"""``pipefusion``: a DiT's blocks as pipeline stages over the ranks, the image's patches streamed through them."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from effdiff.methods.parallel.base import ParallelMethod
from effdiff.registry import Paper, Param, RecipeError

PIPEFUSION = Paper("PipeFusion: Patch-level Pipeline Parallelism for Diffusion Transformers Inference", "2405.14430")


class PipeFusion(ParallelMethod):
    """Patch-level pipeline parallelism for Diffusion Transformers: rank ``r`` holds the ``r``-th of ``N``
    consecutive groups of transformer blocks (a pipeline stage) and the image's token sequence is cut into
    ``patches``; each patch goes through rank 0's blocks, is sent to rank 1 while rank 0 starts the next patch, and
    so on, so the stages work on different patches at once. A patch's self-attention needs the whole image's keys
    and values: each stage keeps them per layer, fresh for the patches already through it this step and one step
    stale for the rest (the displaced-patch idea of DistriFusion, but no keys or values cross the network — only
    one patch's activations between neighbouring stages). The first ``warmup`` steps run the image as one patch
    (every key fresh); the last stage broadcasts the blocks' output so every rank finishes the step.

    ``patches=1`` is plain pipeline (model) parallelism: the single-process computation, bit for bit. Caches and
    token methods are refused beside it (a layer runs once per patch, not once per step); U-Nets and MMDiTs have no
    token split here. xDiT's PipeFusion is not installable here (no xfuser wheel for this machine), so this is
    effdiff's own.

    Paper: Fang et al., "PipeFusion: Patch-level Pipeline Parallelism for Diffusion Transformers Inference",
    arXiv 2405.14430.
    """

    name = "pipefusion"
    paper = PIPEFUSION
    summary = "a DiT's blocks as pipeline stages over the ranks, patches streamed through; stale keys per stage"
    backbones = frozenset({"dit"})
    streams = frozenset({"single"})
    params = {
        "patches": Param(int, 2, 1, 64, help="patches of the token sequence streamed through the stages"),
        "warmup": Param(int, 1, 0, 1000, help="first steps run as one patch, every key fresh"),
    }

    def apply(self, pipe: Any, ctx: Any) -> None:
        self._unregister: Any = lambda: None
        self.join_ranks()
        layout = self.adapter.patch_layout()
        if layout is None or layout.split != "tokens":
            raise RecipeError(f"{self.name}: {type(self.adapter.model).__name__} has no token split")
        beside = [m.name for m in self.recipe if m.family in ("cache", "tokens")]
        if beside:
            raise RecipeError(f"{self.name}: {', '.join(beside)} caches or reduces per layer call, and each layer runs "
                              "once per patch here; not stacked")
        blocks = [ref.module for ref in self.adapter.blocks()]
        if len(blocks) < self.world:
            raise RecipeError(f"{self.name}: {len(blocks)} blocks cannot make {self.world} pipeline stages")
        self.ctx = ctx
        bounds = [len(blocks) * r // self.world for r in range(self.world + 1)]
        self.stage = range(bounds[self.rank], bounds[self.rank + 1])
        self.inner: list[Any] = []
        for index, block in enumerate(blocks):
            self.patches.forward(block, self._stage_block(index))
        self.rows = slice(None)
        for _, attn in self.adapter.self_attentions():
            for projection in (attn.to_k, attn.to_v):
                self.patches.forward(projection, self._whole_image_keys())
        self.keys: dict[int, torch.Tensor] = {}
        self.sent_bytes = 0  # activations this rank sent (measured communication)
        self._unregister = ctx.on_reset(self.keys.clear)

    def _stage_block(self, index: int) -> Any:
        def make(inner: Any) -> Any:
            self.inner.append(inner)

            def forward(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
                # the model calls every block in turn: the first runs the whole pipeline, the rest pass it on
                return self._pipeline(hidden, args, kwargs) if index == 0 else hidden

            return forward

        return make

    def _pipeline(self, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        first = self.ctx.step_index < self["warmup"] or not self.keys  # no stale keys yet: one patch
        patches = 1 if first else self["patches"]
        tokens = hidden.shape[1]
        if tokens % patches:
            raise RecipeError(f"{self.name}: {tokens} tokens do not split into {patches} patches")
        share, out, sends = tokens // patches, torch.empty_like(hidden), []
        for patch in range(patches):
            self.rows = slice(patch * share, (patch + 1) * share) if patches > 1 else slice(None)
            if self.rank == 0:
                part = hidden[:, self.rows].contiguous()
            else:
                part = torch.empty_like(hidden[:, self.rows]).contiguous()
                dist.recv(part, self.members[self.rank - 1], group=self.group)
            for index in self.stage:
                part = self.inner[index](part, *args, **kwargs)
            if self.rank < self.world - 1:
                part = part.contiguous()
                after = self.members[self.rank + 1]
                sends.append((part, dist.isend(part, after, group=self.group)))  # the tensor stays alive until sent
                self.sent_bytes += part.numel() * part.element_size()
            else:
                out[:, self.rows] = part
        for _, send in sends:
            send.wait()
        self.rows = slice(None)
        dist.broadcast(out, self.members[-1], group=self.group)
        if self.rank == self.world - 1:
            self.sent_bytes += out.numel() * out.element_size()
        return out

    def _whole_image_keys(self) -> Any:
        def make(inner: Any) -> Any:
            def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
                fresh = inner(x, *args, **kwargs)
                if self.rows == slice(None):
                    self.keys[id(forward)] = fresh.clone()
                    return fresh
                whole = self.keys[id(forward)]
                whole[:, self.rows] = fresh
                return whole

            return forward

        return make

    def remove(self) -> None:
        self._unregister()
