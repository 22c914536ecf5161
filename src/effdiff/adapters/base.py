"""The uniform structural view of a denoiser that methods program against."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

# How a block is called and what it returns (after cache-dit's "forward patterns"):
#   "unet_down": (hidden, temb, ...) -> (hidden, tuple of skip features)
#   "unet_mid":  (hidden, temb, ...) -> hidden
#   "unet_up":   (hidden, res_hidden_states_tuple, temb, ...) -> hidden
#   "hidden":    (hidden, ...) -> hidden                         (DiT, PixArt)
#   "joint":     (hidden, encoder_hidden, temb, ...) -> (encoder_hidden, hidden)   (SD3, Flux; SD3's last block
#                returns None for encoder_hidden)
PATTERNS = ("unet_down", "unet_mid", "unet_up", "hidden", "joint")
# How the text and image tokens flow through a block (what a token method may touch):
#   "single": image tokens only; text enters by cross-attention (SD U-Net, PixArt) or not at all (DiT)
#   "joint":  two streams, image and text, each with its own weights, meeting in one attention (FLUX double
#             blocks, SD3 joint blocks)
#   "concat": one stream of text tokens followed by image tokens, the text part split off again at the end
#             (FLUX single blocks)
STREAMS = ("single", "joint", "concat")


class Streams(NamedTuple):
    """The token streams a block reads and writes: image ``hidden`` and, in joint blocks, text ``encoder``.

    Arithmetic is stream-wise (``None`` stays ``None``), so a cache computes one residual, difference or
    Taylor term for both streams of an MMDiT block with the code it uses for one.
    """

    hidden: torch.Tensor
    encoder: torch.Tensor | None = None

    def _zip(self, other: Streams, op: Any) -> Streams:
        encoder = None if self.encoder is None or other.encoder is None else op(self.encoder, other.encoder)
        return Streams(op(self.hidden, other.hidden), encoder)

    def __add__(self, other: Any) -> Streams:  # type: ignore[override]
        return self._zip(other, lambda a, b: a + b)

    def __sub__(self, other: Streams) -> Streams:
        return self._zip(other, lambda a, b: a - b)

    def __mul__(self, factor: Any) -> Streams:  # type: ignore[override]
        return Streams(self.hidden * factor, None if self.encoder is None else self.encoder * factor)

    def __truediv__(self, divisor: Any) -> Streams:
        return Streams(self.hidden / divisor, None if self.encoder is None else self.encoder / divisor)

    def same_shapes(self, other: Streams) -> bool:
        """Whether ``self - other`` is a residual (a U-Net segment cut at a skip branch changes the shape)."""
        pairs = [(self.hidden, other.hidden)]
        if self.encoder is not None and other.encoder is not None:
            pairs.append((self.encoder, other.encoder))
        return all(a.shape == b.shape for a, b in pairs)


def hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The ``hidden_states`` a block (or the denoiser) was called with, positional or keyword."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


@dataclass
class BlockRef:
    """One block, where it lives (so it can be wrapped or swapped) and how it is called."""

    name: str
    module: nn.Module
    parent: nn.Module
    key: int | str
    role: str
    pattern: str
    streams: str = "single"

    # --- reading and writing a call of this block, by its pattern --------------------------------------
    def hidden_in(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The image-token (or U-Net feature map) input."""
        return hidden_of(args, kwargs)

    def streams_in(self, args: tuple, kwargs: dict) -> Streams:
        hidden = self.hidden_in(args, kwargs)
        if self.pattern != "joint":
            return Streams(hidden)
        encoder = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
        return Streams(hidden, encoder)

    def streams_out(self, out: Any) -> Streams:
        if self.pattern == "joint":
            return Streams(out[1], out[0])
        return Streams(out if isinstance(out, torch.Tensor) else out[0])

    def hidden_out(self, out: Any) -> torch.Tensor:
        return self.streams_out(out).hidden

    def pack(self, streams: Streams) -> Any:
        """What this block returns when its output is ``streams`` (skipped blocks, cached spans)."""
        if self.pattern == "joint":
            return streams.encoder, streams.hidden
        return streams.hidden

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


@dataclass
class TokenBlock:
    """A transformer block whose image tokens a token method may reduce, or cache token by token.

    ``stride`` is latent units per token side, relative to ``Adapter.token_grid``; ``level`` the U-Net
    downsample factor (1 for every DiT block). Sub-layers by role, as attribute names on the block:
    ``attn`` self-attention (in "joint" and "concat" blocks the joint attention, whose *image* part is
    reduced; SD3.5's image-only second attention), ``cross`` cross-attention to the text, ``ff`` the image
    tokens' feed-forward (FLUX single blocks: ``proj_mlp``, the token-wise input half of their MLP).
    In a "concat" block every sub-layer sees the text tokens first, then the image tokens. ``rope``: the
    keyword under which the block's attention receives rotary position tables (text rows first), so a
    reduced sequence can carry the positions of the tokens it kept.
    """

    name: str
    module: nn.Module
    stride: int
    level: int = 1
    streams: str = "single"
    attn: tuple[str, ...] = ("attn1",)
    cross: tuple[str, ...] = ("attn2",)
    ff: tuple[str, ...] = ("ff",)
    rope: str | None = None

    def image_out(self, out: Any) -> torch.Tensor:
        """The image tokens a call of the block returned (MMDiT blocks return ``(text, image)``)."""
        return out if self.streams == "single" else out[1]

    def with_image(self, out: Any, image: torch.Tensor) -> Any:
        """The block's output ``out`` with its image tokens replaced by ``image``."""
        return image if self.streams == "single" else (out[0], image)

    def layers(self, role: str) -> list[tuple[str, nn.Module]]:
        """(attribute, module) of this block's sub-layers in ``role`` ("attn", "cross", "ff") that exist."""
        return [(n, getattr(self.module, n)) for n in getattr(self, role) if getattr(self.module, n, None) is not None]


@dataclass
class CacheLayer:
    """A layer whose output a layer cache (FORA, TaylorSeer) may serve at cached steps, and the layers that only
    feed it (``feeds``): while it is served their work would be thrown away, so they need not run."""

    name: str
    module: nn.Module
    feeds: tuple[nn.Module, ...] = ()


@dataclass(frozen=True)
class PatchLayout:
    """How a denoiser's image splits into equal patches, one per rank, for patch parallelism (DistriFusion).

    ``rows``: the input latent splits by rows and every layer sees its rows (U-Nets) — a convolution then needs
    its neighbours' boundary rows, a GroupNorm the whole image's statistics, a self-attention every row's keys;
    each patch's height must be a multiple of ``row_multiple`` (the downsampling between the input and the
    innermost level), so every level splits on whole rows; ``entry`` is the layer that reads the input latent
    itself (its boundary rows come from the whole latent every rank holds). ``tokens``: the token sequence
    ``entry`` returns splits and ``exit``'s output is gathered (DiTs: between them each layer is per token except
    self-attention).
    """

    split: str
    row_multiple: int = 1
    entry: nn.Module | None = None
    exit: nn.Module | None = None


@dataclass(frozen=True)
class SequenceLayout:
    """How a DiT's token sequence splits between ranks for sequence parallelism: ``image`` returns the image tokens
    and ``text`` an MMDiT's text tokens (None where the text is only cross-attended), each split by tokens;
    ``rotary`` returns rotary tables over the text's tokens then the image's (FLUX; None where positions are added
    at the embedding); ``exit`` is a per-token layer after the last block, whose output is gathered; ``attentions``
    are the attentions over image (and text) tokens, made whole over the ranks. Everything else works per token,
    or on the text the text attention keeps whole."""

    image: nn.Module
    exit: nn.Module
    attentions: tuple[tuple[str, nn.Module], ...]
    text: nn.Module | None = None
    rotary: nn.Module | None = None


def basic_transformer_blocks(ref: BlockRef, stride: int, level: int = 1) -> list[TokenBlock]:
    """diffusers' ``BasicTransformerBlock``s in a block (SD U-Nets' ``Transformer2DModel``, PixArt, DiT)."""
    from diffusers.models.attention import BasicTransformerBlock

    found = [(ref.name, ref.module)] if isinstance(ref.module, BasicTransformerBlock) else [
        (f"{ref.name}.{n}", m) for n, m in ref.module.named_modules() if isinstance(m, BasicTransformerBlock)]
    return [TokenBlock(name, module, stride, level) for name, module in found]


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

    def middle_block(self) -> BlockRef:
        """The block in the middle of a call: a U-Net's mid-block (its lowest resolution; the first up block when
        it has none), a transformer's middle block — the bottleneck DMD2 reads its discriminator features from."""
        blocks = self.blocks()
        return blocks[len(blocks) // 2]

    def stream_layouts(self) -> frozenset[str]:
        """The stream layouts of the blocks (``STREAMS``); what a method's declared ``streams`` must cover."""
        return frozenset(ref.streams for ref in self.blocks())

    def skips(self) -> list[tuple[int, int]]:
        """(index of producing block, index of consuming block) in ``blocks()``; empty for DiTs."""
        return []

    def attention(self) -> list[tuple[str, nn.Module]]:
        """Every diffusers attention module (``Attention`` or an ``AttentionModuleMixin``), by name."""
        from diffusers.models.attention import AttentionModuleMixin
        from diffusers.models.attention_processor import Attention

        kinds = (Attention, AttentionModuleMixin)
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, kinds)]

    def self_attentions(self) -> list[tuple[str, nn.Module]]:
        """Attention modules whose keys and values come from the image tokens themselves (not the text's, and
        not a joint text+image sequence): the layers that see the whole image when the image is split."""
        return [(n, m) for n, m in self.attention()
                if not getattr(m, "is_cross_attention", False) and getattr(m, "add_k_proj", None) is None]

    def patch_layout(self) -> PatchLayout | None:
        """How the image splits into patches across ranks; None where the architecture has no known split."""
        return None

    def sequence_layout(self) -> SequenceLayout | None:
        """How the token sequence splits across ranks; None for denoisers that are not token sequences (U-Nets)."""
        return None

    def linears(self) -> list[tuple[str, nn.Linear]]:
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, nn.Linear)]

    def context_parallel_planned(self) -> bool:
        """Whether diffusers has a context-parallel plan for this model (FLUX, Wan, QwenImage, LTX…)."""
        return getattr(self.model, "_cp_plan", None) is not None

    def enable_context_parallel(self, ring: int, ulysses: int) -> Callable[[], None]:
        """diffusers' context parallelism over every rank; returns what undoes it (the plan's split/gather hooks
        removed, the config recorded on the model and on each attention processor cleared). On an accelerator
        through ``enable_parallelism``; on a CPU, which ``enable_parallelism`` cannot place (it takes the rank
        modulo the accelerator count), by its same steps with a gloo mesh on the CPU — the config set up, recorded
        on the model and its processors, the plan's hooks applied."""
        import torch.distributed as dist
        from diffusers import ContextParallelConfig
        from diffusers.hooks.context_parallel import apply_context_parallel, remove_context_parallel
        from diffusers.models._modeling_parallel import ParallelConfig
        from torch.distributed.device_mesh import init_device_mesh

        model: Any = self.model
        config = ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses)
        processors = [m.processor for m in model.modules()
                      if hasattr(getattr(m, "processor", None), "_parallel_config")]
        if self.device.type != "cpu":
            model.enable_parallelism(config=config)
        else:
            whole = ParallelConfig(context_parallel_config=config)
            mesh = init_device_mesh("cpu", mesh_shape=config.mesh_shape, mesh_dim_names=config.mesh_dim_names)
            whole.setup(dist.get_rank(), dist.get_world_size(), self.device, mesh=mesh)
            model._parallel_config = whole
            for processor in processors:
                processor._parallel_config = whole
            apply_context_parallel(model, config, model._cp_plan)

        def undo() -> None:
            remove_context_parallel(model, model._cp_plan)
            model._parallel_config = None
            for processor in processors:
                processor._parallel_config = None

        return undo

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def describe(self) -> str:
        blocks = self.blocks()
        return (f"{type(self.model).__name__} ({self.kind}): {len(blocks)} blocks, "
                f"{len(self.attention())} attention modules, {len(self.linears())} linear layers")

    def modulated_input(self, ref: BlockRef, args: tuple, kwargs: dict) -> torch.Tensor:
        """The block's timestep-modulated input (TeaCache's change signal) for one call of the block."""
        return ref.hidden_in(args, kwargs)

    def cache_layers(self) -> list[CacheLayer]:
        """Every attention and feed-forward layer (diffusers' ``FeedForward``): what the blocks gate and add to
        their residual stream, so a cached output re-enters through the current step's modulation."""
        from diffusers.models.attention import FeedForward

        layers = [CacheLayer(n, m) for n, m in self.attention()]
        return layers + [CacheLayer(n, m) for n, m in self.model.named_modules() if isinstance(m, FeedForward)]

    def token_blocks(self) -> list[TokenBlock]:
        """The blocks token methods work in, in execution order (``BasicTransformerBlock``s by default)."""
        patch = int(getattr(self.model.config, "patch_size", 1) or 1)
        return [t for ref in self.blocks() for t in basic_transformer_blocks(ref, patch)]

    def image_queries_keys(self, block: TokenBlock, attn: nn.Module, image: torch.Tensor,
                           kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys (B, heads, N, D) that ``attn`` forms for the ``image`` tokens (B, N, C) of a call made
        with ``kwargs``: projections, per-head q/k norms, and the image rows of the call's rotary table (the text
        rows come first). What a joint attention's processor computes for its image part, for methods that need
        the attention map SDPA never returns."""
        q, k = (proj(image).unflatten(-1, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k))
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q)
        if getattr(attn, "norm_k", None) is not None:
            k = attn.norm_k(k)
        table = kwargs.get(block.rope) if block.rope else None
        if table is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            rows = tuple(t[t.shape[0] - image.shape[1]:] for t in table)
            q, k = (apply_rotary_emb(t, rows, sequence_dim=1) for t in (q, k))
        return q.transpose(1, 2), k.transpose(1, 2)

    def timestep_embedding(self) -> tuple[str, nn.Module] | None:
        """(name, module) whose output is the per-sample conditioning vector every block reads (the timestep
        embedding), where guidance distillation adds its w embedding; None where each block embeds its own."""
        return None

    def guidance_embedded(self) -> bool:
        """Whether the model already takes the guidance scale as an input (a guidance-distilled model)."""
        return bool(getattr(self.model.config, "guidance_embeds", False))

    def pruning_kept(self) -> list[nn.Module] | None:
        """Layers whose output width structural pruning must keep (the output projection, and whatever the
        model reshapes by a fixed width); None where no pruning plan is known for the architecture."""
        return None

    def block_output_layer(self, ref: BlockRef) -> str | None:
        """The layer (its name in the model) whose output channels ``ref``'s hidden output carries, so a
        channel-pruned block's output can be matched to the teacher's channels it kept; None where pruning keeps
        the block's output width (a DiT's residual stream: its heads and feed-forward widths are what is pruned)."""
        return None

    def example_call(self, batch: int = 1, text_tokens: int = 8) -> dict[str, Any]:
        """Keyword arguments of one denoiser call at the model's native size (random tensors), for tracing its
        layer dependencies and counting its MACs."""
        raise NotImplementedError(f"no example call for {type(self.model).__name__}")

    def removable_layers(self) -> list[tuple[str, nn.Module]]:
        """Layers whose output has its input's shape, so the model still runs when one is skipped (its input
        passed on unchanged): depth pruning's candidates. By default the single-stream transformer blocks (a
        joint block returns two streams, which a skipped layer cannot stand in for)."""
        return [(ref.name, ref.module) for ref in self.blocks() if ref.streams == "single"]

    def fix_pruned_widths(self, heads: dict[nn.Module, int]) -> None:
        """After structural pruning changed layer widths in place, set the attributes diffusers' forwards read
        instead of the weights' shapes: each attention's head count (``heads``: its query projection -> the
        heads left) and inner width."""
        for _, attn in self.attention():
            kept = heads.get(attn.to_q)
            if kept is None or kept == attn.heads:
                continue
            attn.heads = kept
            for attr, projection in (("inner_dim", attn.to_q), ("inner_kv_dim", attn.to_k)):
                if isinstance(getattr(attn, attr, None), int):
                    setattr(attn, attr, projection.out_features)

    def native_grid(self) -> tuple[int, int] | None:
        """(rows, cols) of the denoiser's input at the size it was configured for (``sample_size``), the grid
        ``token_grid`` reports at that size; None where the config does not say."""
        size = getattr(getattr(self.model, "config", None), "sample_size", None)
        if isinstance(size, int):
            return size, size
        if isinstance(size, (tuple, list)) and len(size) == 2:
            return int(size[0]), int(size[1])
        return None

    def token_grid(self, args: tuple, kwargs: dict) -> tuple[int, int]:
        """(rows, cols) of the denoiser's input, the grid ``TokenBlock.stride`` divides: its latent's size."""
        sample = hidden_of(args, kwargs)
        return int(sample.shape[-2]), int(sample.shape[-1])

    @staticmethod
    def _list(model: nn.Module, attr: str, role: str, pattern: str, streams: str = "single") -> list[BlockRef]:
        container: Any = getattr(model, attr, None)
        if container is None:
            return []
        return [BlockRef(f"{attr}.{i}", block, container, i, role, pattern, streams)
                for i, block in enumerate(container)]
