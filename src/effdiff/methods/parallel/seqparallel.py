"""``seqparallel``: one image's token sequence split between ranks, attention made whole by Ulysses and ring."""

from __future__ import annotations

from typing import Any

from torch import nn

from effdiff.methods.parallel.base import ParallelMethod
from effdiff.methods.parallel.sequence import (
    Mesh,
    WholeSequenceAttention,
    gather_stream,
    make_mesh,
    rotary_rows,
    split_stream,
)
from effdiff.registry import Paper, Param, RecipeError

USP = Paper("USP: A Unified Sequence Parallelism Approach for Long Context Generative AI", "2405.07719")
ULYSSES = Paper("DeepSpeed Ulysses: System Optimizations for Enabling Training of Extreme Long Sequence Transformer "
                "Models", "2309.14509")
RING = Paper("Ring Attention with Blockwise Transformers for Near-Infinite Context", "2310.01889")


class SequenceParallel(ParallelMethod):
    """Sequence (context) parallelism: each of ``N`` ranks holds ``1/N`` of the image's tokens through every block
    (an MMDiT's text tokens too: FLUX and SD3 attend over text and image as one sequence; FLUX's rotary rows follow
    the split); everything per token (projections, feed-forward, cross-attention to the text) runs on its share
    alone, and each self- or joint attention is made whole over the ranks — **exact**, unlike DistriFusion's stale
    patches. Shares need not be equal (SD3's 333 text tokens on 2 ranks):

    - **Ulysses** (DeepSpeed-Ulysses): an all-to-all turns "my tokens, every head" into "every token, my heads",
      attention runs whole per head, a second all-to-all turns it back. Moves 4 × the local activations per
      attention whatever the world size; heads need not divide by the ranks (the split is uneven, as diffusers'
      "Ulysses anything").
    - **Ring** (Ring Attention): keys and values travel round the ranks one chunk at a time, the next chunk
      arriving while the current one is computed; partial results merge by their log-sum-exps. No head limit.
    - ``ring=R`` with ``N = R × U``: USP's hybrid (Ulysses inside groups of ``U`` neighbouring ranks, rings across
      them) — what xDiT runs.

    Engine: on accelerators, Ulysses on a denoiser that diffusers gives a context-parallel plan (FLUX, Wan,
    QwenImage, LTX…) runs on diffusers' own ``enable_parallelism(ContextParallelConfig(ring_degree,
    ulysses_degree))`` (``engine=auto``); ``engine=diffusers`` asks for it anywhere it can run — on a CPU too
    (Ulysses only, set up by the adapter since ``enable_parallelism`` places ranks by accelerator count). diffusers
    has no plan for PixArt, DiT or SD3 (whose processors call SDPA directly), its ring needs an attention backend
    that returns the log-sum-exp, and its mesh spans every rank (so not inside ``cfgparallel``'s branches): there
    effdiff's own runs (``engine=effdiff``), over gloo or NCCL, and splits streams unevenly where diffusers needs
    them to divide. Effdiff's replaces each attention's ``scaled_dot_product_attention`` call inside the module
    (``WholeSequenceAttention``), so diffusers' processors — projections, QK norms, rotary, text and image
    concatenated — run unchanged on each rank's share. xDiT (xfuser) does not install here.

    Stacking: solvers, compressed/quantized/distilled models and fixed-schedule caches (``fora``, ``taylorseer``)
    stack; caches that decide from the features and token methods would decide on each rank's share differently
    (and the ranks' collectives would no longer pair up), so they are refused. ``compile`` (in the recipe, or the
    denoiser compiled before ``accelerate``) compiles beneath the patches: dynamo traces each attention with the
    interception active, Ulysses' all-to-alls inside the graph, the ring's point-to-point sends between graphs.

    Papers: Fang & Zhao, "USP: A Unified Sequence Parallelism Approach for Long Context Generative AI",
    arXiv 2405.07719; Jacobs et al., "DeepSpeed Ulysses", arXiv 2309.14509; Liu et al., "Ring Attention with
    Blockwise Transformers for Near-Infinite Context", arXiv 2310.01889.
    """

    name = "seqparallel"
    aliases = ("usp", "context-parallel")
    paper = USP
    also = (ULYSSES, RING)
    summary = "one image's tokens split between ranks; attention whole by Ulysses all-to-all and/or ring: exact"
    backbones = frozenset({"dit"})
    streams = frozenset({"single", "joint", "concat"})
    params = {
        "ring": Param(int, 1, 1, 1024, help="ranks per ring (ring attention); the other factor of the world size "
                                            "runs Ulysses (1 = Ulysses only, world size = ring only)"),
        "engine": Param(str, "auto", choices=("auto", "effdiff", "diffusers"),
                        help="auto: diffusers' context parallelism where it has a plan and an accelerator, "
                             "else effdiff's"),
    }
    REFUSED = ("fbcache", "teacache", "l2c", "toca", "deltadit", "taylorseer-blocks")

    def apply(self, pipe: Any, ctx: Any) -> None:
        self.join_ranks()
        if self.world % self["ring"]:
            raise RecipeError(f"{self.name}: ring={self['ring']} does not divide the world size {self.world}")
        beside = [m.name for m in self.recipe if m.name in self.REFUSED or m.family == "tokens"]
        if beside:
            raise RecipeError(f"{self.name}: {', '.join(beside)} decides from the features or changes the tokens, "
                              "which each rank holds only its share of; use a fixed-schedule cache (fora, taylorseer)")
        model = self.adapter.model
        if self.engine(model) == "diffusers":
            self._diffusers(model)
        else:
            self._effdiff(model)

    def engine(self, model: nn.Module) -> str:
        """Which implementation runs. ``auto``: diffusers' where it has a plan for the model, the model is on an
        accelerator, the ranks are the whole world and the split is Ulysses (diffusers' ring needs an attention
        backend that returns the log-sum-exp, which its default native one does not); effdiff's otherwise.
        ``diffusers`` is refused only where it cannot run: no plan, inside ``cfgparallel``'s branches (its mesh
        spans the world), a ring on the CPU's native backend."""
        planned = self.adapter.context_parallel_planned()
        on_accelerator = self.adapter.device.type != "cpu"
        if self["engine"] == "diffusers":
            why = self._why_not_diffusers(planned, on_accelerator)
            if why:
                raise RecipeError(f"{self.name}: {type(model).__name__} {why}; use engine=effdiff")
            return "diffusers"
        wanted = (self["engine"] == "auto" and planned and on_accelerator and self.group is None
                  and self["ring"] == 1)
        return "diffusers" if wanted else "effdiff"

    def _why_not_diffusers(self, planned: bool, on_accelerator: bool) -> str:
        """Why diffusers' engine cannot run this split ("" when it can)."""
        if not planned:
            return "has no context-parallel plan in diffusers"
        if self.group is not None:
            return "is split inside cfgparallel's branches, and diffusers' context parallelism spans every rank"
        if self["ring"] > 1 and not on_accelerator:
            return "is on the CPU, where diffusers' native attention has no ring (it returns no log-sum-exp)"
        return ""

    def _effdiff(self, model: nn.Module) -> None:
        layout = self.adapter.sequence_layout()
        if layout is None:
            raise RecipeError(f"{self.name}: {type(model).__name__} is not a token sequence; split a U-Net's image "
                              "with distrifusion")
        heads = min(attn.heads for _, attn in layout.attentions)
        self.mesh = make_mesh(self.branches, self.global_rank, self["ring"], self.group)
        if self.mesh.ulysses > heads:
            raise RecipeError(f"{self.name}: Ulysses over {self.mesh.ulysses} ranks needs at least as many heads "
                              f"({heads} here); use ring={self.world}")
        self.patches.forward(layout.image, split_stream(self.mesh, "image"))
        if layout.text is not None:
            self.patches.forward(layout.text, split_stream(self.mesh, "text"))
        if layout.rotary is not None:
            self.patches.forward(layout.rotary, rotary_rows(self.mesh))
        self.patches.forward(layout.exit, gather_stream(self.mesh, "image", self.group))
        for name, attn in layout.attentions:
            self.patches.forward(attn, self._whole_sequence(name))

    @property
    def sent_bytes(self) -> int:
        """Bytes this rank has sent in its attentions' exchanges (effdiff's engine; measured communication)."""
        return self.mesh.sent if hasattr(self, "mesh") else 0

    def _whole_sequence(self, name: str) -> Any:
        """An attention module whose ``scaled_dot_product_attention`` runs over every rank's tokens; refused when
        its processor computes attention without it (another backend), which the split would silently miss."""
        mesh: Mesh = self.mesh

        def make(inner: Any) -> Any:
            def forward(*args: Any, **kwargs: Any) -> Any:
                with WholeSequenceAttention(mesh, name) as mode:
                    out = inner(*args, **kwargs)
                if not mode.calls:
                    raise RecipeError(f"{self.name}: {name} computed its attention without torch's "
                                      "scaled_dot_product_attention (another attention backend); set the native one")
                return out

            return forward

        return make

    def _diffusers(self, model: nn.Module) -> None:
        """diffusers' context parallelism, undone through the log."""
        self.patches.call(self.adapter.enable_context_parallel(self["ring"], self.world // self["ring"]))
