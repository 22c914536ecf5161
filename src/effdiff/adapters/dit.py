"""Diffusion-Transformer adapters: PixArt and DiT (single-stream), SD3 and FLUX (two-stream MMDiTs).

Each adapter lists its blocks with the pattern they are called by and their stream layout, and knows
where a block's timestep-modulated input is (TeaCache's change signal), so no method reads these
diffusers internals itself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from effdiff.adapters.base import Adapter, BlockRef, CacheLayer, PatchLayout, SequenceLayout, TokenBlock


class DiTAdapter(Adapter):
    kind = "dit"
    model_class = "DiTTransformer2DModel"

    def blocks(self) -> list[BlockRef]:
        return self._list(self.model, "transformer_blocks", "transformer", "hidden")

    def patch_layout(self) -> PatchLayout | None:
        """Tokens: ``pos_embed`` patchifies the latent and adds positions, the blocks work per token except their
        self-attention, and the output layer after the last block is per token too."""
        return PatchLayout("tokens", entry=self.model.pos_embed, exit=self.model.transformer_blocks[-1])

    def sequence_layout(self) -> SequenceLayout | None:
        """The patch split's token entry and exit; the text is only cross-attended, so every rank keeps it whole."""
        return SequenceLayout(image=self.model.pos_embed, exit=self.model.transformer_blocks[-1],
                              attentions=tuple(self.self_attentions()))

    def modulated_input(self, ref: BlockRef, args: tuple, kwargs: dict) -> torch.Tensor:
        """A ``BasicTransformerBlock``'s normalised, timestep-modulated input: PixArt's adaLN-single, DiT's
        adaLN-zero; the plain input for blocks without a timestep modulation."""
        block, hidden = ref.module, ref.hidden_in(args, kwargs)
        norm_type = getattr(block, "norm_type", None)
        timestep = kwargs.get("timestep")
        if timestep is not None and norm_type == "ada_norm_single":
            table = block.scale_shift_table[None] + timestep.reshape(hidden.shape[0], 6, -1)
            shift, scale = table.chunk(6, dim=1)[:2]
            return block.norm1(hidden) * (1 + scale) + shift
        if timestep is not None and norm_type == "ada_norm_zero":
            return block.norm1(hidden, timestep, kwargs.get("class_labels"), hidden_dtype=hidden.dtype)[0]
        return hidden


class PixArtAdapter(DiTAdapter):
    model_class = "PixArtTransformer2DModel"

    def pruning_kept(self) -> list[nn.Module] | None:
        """``proj_out`` (the patch's pixels), adaLN-single (its linear is split into six per-block modulations
        of the hidden width, and the output's shift and scale) and the caption projection (its output is added
        to attention widths the blocks' ``scale_shift_table`` fixes): so the hidden width stays, and heads and
        feed-forward widths are what pruning removes."""
        return [self.model.proj_out, self.model.adaln_single, self.model.caption_projection]

    def example_call(self, batch: int = 1, text_tokens: int = 8) -> dict[str, Any]:
        config = self.model.config
        return {"hidden_states": torch.randn(batch, config.in_channels, config.sample_size, config.sample_size,
                                             device=self.device),
                "encoder_hidden_states": torch.randn(batch, text_tokens, config.caption_channels,
                                                     device=self.device),
                "timestep": torch.full((batch,), 500, device=self.device),
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}

    def timestep_embedding(self) -> tuple[str, nn.Module] | None:
        """adaLN-single's ``emb``: the timestep (and size) embedding its linear turns into every block's
        modulation and the output layer's shift and scale."""
        return "adaln_single.emb", self.model.adaln_single.emb


class _MMDiTAdapter(DiTAdapter):
    """Joint blocks ``(hidden, encoder_hidden, temb, ...) -> (encoder_hidden, hidden)``; the modulated input is
    the image stream through the first adaLN-zero (``norm1``), as TeaCache's FLUX code reads it."""

    def patch_layout(self) -> PatchLayout | None:
        """None: the joint attention's rotary table and text rows would have to follow the split."""
        return None

    def sequence_layout(self) -> SequenceLayout | None:
        """Image and text tokens both split (the joint attention sees them as one sequence); the output norm works
        per image token, so it is where the image is gathered; every attention is over the joint or image
        sequence."""
        return SequenceLayout(image=self.image_embedding(), text=self.model.context_embedder,
                              exit=self.model.norm_out, attentions=tuple(self.attention()), rotary=self.rotary())

    def image_embedding(self) -> nn.Module:
        """The layer that returns the image tokens: SD3's patch embedding (which adds the positions)."""
        return self.model.pos_embed

    def rotary(self) -> nn.Module | None:
        """The layer returning the rotary tables (text rows first); None: positions are added at the embedding."""
        return None

    def timestep_embedding(self) -> tuple[str, nn.Module] | None:
        """``time_text_embed``: timestep (+ guidance) + pooled text, the ``temb`` every joint block reads."""
        return "time_text_embed", self.model.time_text_embed

    def modulated_input(self, ref: BlockRef, args: tuple, kwargs: dict) -> torch.Tensor:
        hidden = ref.hidden_in(args, kwargs)
        temb = kwargs.get("temb", args[2] if len(args) > 2 else None)
        norm = getattr(ref.module, "norm1", None)
        if temb is None or norm is None:
            return hidden
        out: Any = norm(hidden, emb=temb)
        return out[0] if isinstance(out, tuple) else out


class SD3Adapter(_MMDiTAdapter):
    model_class = "SD3Transformer2DModel"

    def blocks(self) -> list[BlockRef]:
        return self._list(self.model, "transformer_blocks", "transformer", "joint", "joint")

    def token_blocks(self) -> list[TokenBlock]:
        """Joint blocks: the joint attention ``attn`` (text keys and queries kept whole), SD3.5's image-only
        ``attn2``, the image feed-forward ``ff`` (``ff_context``, the text's, is never touched). Positions are
        added at the patch embedding, so nothing travels with a reduced sequence."""
        patch = int(self.model.config.patch_size)
        return [TokenBlock(ref.name, ref.module, patch, streams="joint", attn=("attn", "attn2"), cross=())
                for ref in self.blocks()]


class FluxAdapter(_MMDiTAdapter):
    model_class = "FluxTransformer2DModel"

    def blocks(self) -> list[BlockRef]:
        return (self._list(self.model, "transformer_blocks", "transformer", "joint", "joint")
                + self._list(self.model, "single_transformer_blocks", "single", "joint", "concat"))

    def token_blocks(self) -> list[TokenBlock]:
        """Double blocks: joint ``attn`` and the image ``ff``; single blocks: ``attn`` and ``proj_mlp`` over text
        then image tokens. Both attentions take rotary tables as ``image_rotary_emb`` (text rows first); the
        input is already packed into tokens, so the stride is 1 on ``token_grid``."""
        return [TokenBlock(ref.name, ref.module, 1, streams=ref.streams, attn=("attn",), cross=(),
                           ff=("ff",) if ref.streams == "joint" else ("proj_mlp",), rope="image_rotary_emb")
                for ref in self.blocks()]

    def image_embedding(self) -> nn.Module:
        """``x_embedder``: the latent is packed into tokens before the model, so a linear embeds them."""
        return self.model.x_embedder

    def rotary(self) -> nn.Module | None:
        """``pos_embed``: rotary tables from the text ids then the image ids."""
        return self.model.pos_embed

    def cache_layers(self) -> list[CacheLayer]:
        """Double blocks: the joint attention, the image and text feed-forwards. Single blocks: ``proj_out``, the
        projection of attention and MLP together (what the block gates), fed only by ``attn`` and ``proj_mlp``."""
        double = [layer for layer in super().cache_layers() if layer.name.startswith("transformer_blocks.")]
        single = [CacheLayer(f"single_transformer_blocks.{i}.proj_out", block.proj_out, (block.attn, block.proj_mlp))
                  for i, block in enumerate(self.model.single_transformer_blocks)]
        return double + single

    def token_grid(self, args: tuple, kwargs: dict) -> tuple[int, int]:
        """The packed latent's token grid, from the image position ids (rows, cols in columns 1 and 2)."""
        ids = kwargs.get("img_ids")
        if ids is None:
            raise ValueError("FluxTransformer2DModel was called without img_ids; the token grid is unknown")
        low, high = torch.aminmax(ids.reshape(-1, ids.shape[-1])[:, 1:3], dim=0)
        rows, cols = (high - low + 1).tolist()  # one host sync per denoiser call
        return int(rows), int(cols)
