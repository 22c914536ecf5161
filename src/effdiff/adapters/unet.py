"""U-Net adapters: down blocks, mid block, up blocks, with the long skips between them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from effdiff.adapters.base import Adapter, BlockRef, PatchLayout, TokenBlock, basic_transformer_blocks

if TYPE_CHECKING:
    from effdiff.compress.structure import BlockPlan


class _UNetAdapter(Adapter):
    kind = "unet"

    def blocks(self) -> list[BlockRef]:
        out = self._list(self.model, "down_blocks", "down", "unet_down")
        if getattr(self.model, "mid_block", None) is not None:
            mid = self.model.mid_block
            out.append(BlockRef("mid_block", mid, self.model, "mid_block", "mid", "unet_mid"))
        return out + self._list(self.model, "up_blocks", "up", "unet_up")

    def timestep_embedding(self) -> tuple[str, nn.Module] | None:
        """``time_embedding``: the MLP after the sinusoidal timestep features; its output feeds every ResNet."""
        module = getattr(self.model, "time_embedding", None)
        return ("time_embedding", module) if module is not None else None

    def skips(self) -> list[tuple[int, int]]:
        """Down block i feeds the up block at the same resolution (the mirror index)."""
        blocks = self.blocks()
        downs = [i for i, b in enumerate(blocks) if b.role == "down"]
        ups = [i for i, b in enumerate(blocks) if b.role == "up"]
        return list(zip(downs, reversed(ups), strict=False))

    def token_blocks(self) -> list[TokenBlock]:
        """The ``BasicTransformerBlock``s of every level; a block at downsample ``d`` sees ``ceil(H/d) x ceil(W/d)``
        tokens (stride-2 convolutions with padding 1 round up); ``level`` counts like ToMe for SD (1 = full size)."""
        out: list[TokenBlock] = []
        downsample = 1
        for ref in self.blocks():
            out += basic_transformer_blocks(ref, downsample, downsample)
            if ref.role == "down" and getattr(ref.module, "downsamplers", None):
                downsample *= 2
            if ref.role == "up" and getattr(ref.module, "upsamplers", None):
                downsample //= 2
        return out

    def patch_layout(self) -> PatchLayout | None:
        """Rows of the latent: every layer is a convolution, a GroupNorm or a transformer over the level's
        pixels, so each rank runs the whole U-Net on its rows; ``conv_in`` reads the latent every rank holds whole
        (its boundary rows are always fresh). ``center_input_sample`` rescales the input before
        ``conv_in``, whose boundary rows come from the unscaled latent, so such a model has no split."""
        if getattr(self.model.config, "center_input_sample", False):
            return None
        downsamplers = sum(1 for ref in self.blocks()
                           if ref.role == "down" and getattr(ref.module, "downsamplers", None))
        return PatchLayout("rows", row_multiple=2 ** downsamplers, entry=self.model.conv_in)

    def modulated_input(self, ref: BlockRef, args: tuple, kwargs: dict) -> torch.Tensor:
        """The block's first resnet's normalised input plus its projection of the time embedding."""
        hidden = ref.hidden_in(args, kwargs)
        temb = kwargs.get("temb", args[1] if len(args) > 1 else None)
        resnets = getattr(ref.module, "resnets", None)
        if temb is None or not resnets:
            return hidden
        resnet = resnets[0]
        proj = getattr(resnet, "time_emb_proj", None)
        if proj is None or not hasattr(resnet, "norm1"):
            return hidden
        t = proj(resnet.nonlinearity(temb))[:, :, None, None]
        h = resnet.norm1(hidden)
        if getattr(resnet, "time_embedding_norm", "default") == "scale_shift" and t.shape[1] == 2 * h.shape[1]:
            scale, shift = t.chunk(2, dim=1)
            return h * (1 + scale) + shift
        if t.shape[1] == h.shape[1]:
            return h + t
        return hidden


    def pruning_kept(self) -> list[nn.Module] | None:
        """``conv_out`` (its width is the latent's channels) and the extra conditioning embeddings that reshape by
        a fixed head width (SD-XL-style ``add_embedding``, e.g. a text embedding pooled by attention, as tiny-sd
        has; ``encoder_hid_proj``)."""
        extra = [getattr(self.model, name, None) for name in ("add_embedding", "encoder_hid_proj")]
        return [self.model.conv_out, *(module for module in extra if module is not None)]

    def block_output_layer(self, ref: BlockRef) -> str | None:
        """A stage's resampler convolution where it has one, else its last ResNet's ``conv2`` (the shortcut
        convolution that adds to it is pruned with it): what a down, mid or up block returns as its hidden states."""
        resamplers = getattr(ref.module, "downsamplers", None) or getattr(ref.module, "upsamplers", None)
        if resamplers:
            return f"{ref.name}.{'downsamplers' if ref.role == 'down' else 'upsamplers'}.{len(resamplers) - 1}.conv"
        resnets = getattr(ref.module, "resnets", None)
        return f"{ref.name}.resnets.{len(resnets) - 1}.conv2" if resnets else None

    def example_call(self, batch: int = 1, text_tokens: int = 8) -> dict[str, Any]:
        config = self.model.config
        size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
        call: dict[str, Any] = {"sample": torch.randn(batch, config.in_channels, size, size, device=self.device),
                                "timestep": torch.full((batch,), 500, device=self.device)}
        if getattr(config, "cross_attention_dim", None):
            call["encoder_hidden_states"] = torch.randn(batch, text_tokens, config.cross_attention_dim,
                                                        device=self.device)
        return call

    def removable_layers(self) -> list[tuple[str, nn.Module]]:
        """Every ResNet whose input and output widths agree (no shortcut convolution, no resampling), and every
        attention block (``Transformer2DModel``): skipping one keeps the skip connections' count and widths,
        which removing a whole U-Net stage would not."""
        from diffusers.models.resnet import ResnetBlock2D
        from diffusers.models.transformers.transformer_2d import Transformer2DModel

        return [(name, module) for name, module in self.model.named_modules()
                if isinstance(module, Transformer2DModel) or (
                    isinstance(module, ResnetBlock2D) and module.conv_shortcut is None
                    and module.in_channels == module.out_channels and not module.up and not module.down)]

    def block_removal(self, variant: str) -> BlockPlan:
        """BK-SDM's block removal (Kim et al., arXiv 2305.15798) for this U-Net. ``base``: each down stage keeps the
        first half of its ResNet/attention pairs (at least one) and each up stage its first and last pair plus as
        many between as the down stage kept — the skips they read keep their widths; ``small``: base without the
        mid-block; ``tiny``: small without the innermost stage (its down and up block; the stage above becomes the
        last, so its downsampler goes too). Refused where a variant removes nothing or would break a width."""
        from effdiff.compress.structure import BlockPlan

        if variant not in ("base", "small", "tiny"):
            raise ValueError(f"the BK-SDM variant is base, small or tiny, got {variant!r}")
        model, plan = self.model, BlockPlan()
        downs, ups = list(model.down_blocks), list(model.up_blocks)
        for i, down in enumerate(downs):
            layers = len(down.resnets)
            kept = (layers + 1) // 2
            if kept == layers:
                continue
            up_name, up = f"up_blocks.{len(ups) - 1 - i}", ups[len(ups) - 1 - i]
            plan.kept.update(self._pairs(f"down_blocks.{i}", down, list(range(kept))))
            plan.kept.update(self._pairs(up_name, up, [*range(kept), len(up.resnets) - 1]))
        if variant == "base" and not plan.kept:
            raise ValueError(f"BK-SDM base removes the second half of each stage's pairs; this "
                             f"{type(model).__name__} has one pair per down stage already (base is the model itself): "
                             "use small or tiny")
        if variant in ("small", "tiny"):
            if model.mid_block is None:
                raise ValueError(f"{type(model).__name__} has no mid-block to remove")
            plan.dropped.append("mid_block")
        if variant == "tiny":
            if len(downs) < 2 or downs[-1].resnets[-1].out_channels != downs[-2].resnets[-1].out_channels:
                raise ValueError("BK-SDM tiny removes the innermost stage, which needs a stage above it of the "
                                 f"same width; this {type(model).__name__}'s stages are "
                                 f"{[d.resnets[-1].out_channels for d in downs]}")
            plan.kept["down_blocks"] = list(range(len(downs) - 1))
            plan.kept["up_blocks"] = list(range(1, len(ups)))
            plan.dropped.append(f"down_blocks.{len(downs) - 2}.downsamplers")
            plan.settings[""] = {"num_upsamplers": model.num_upsamplers - 1}
        plan.features = [(name, plan.renamed(name)) for name in self._stage_outputs(plan)]
        return plan

    @staticmethod
    def _pairs(name: str, block: nn.Module, kept: list[int]) -> dict[str, list[int]]:
        """The kept ResNets of a stage, and its attentions alongside where it has them."""
        out = {f"{name}.resnets": kept}
        if getattr(block, "attentions", None) is not None:
            out[f"{name}.attentions"] = kept
        return out

    def _stage_outputs(self, plan: BlockPlan) -> list[str]:
        """Each remaining stage's last layer before its resampler (its attention where it has one): the
        features BK-SDM distils, stage by stage."""
        removed_down = set(range(len(self.model.down_blocks))) - set(plan.kept.get("down_blocks",
                                                                                   range(len(self.model.down_blocks))))
        removed_up = set(range(len(self.model.up_blocks))) - set(plan.kept.get("up_blocks",
                                                                               range(len(self.model.up_blocks))))
        names = []
        for kind, removed in (("down_blocks", removed_down), ("up_blocks", removed_up)):
            for i, block in enumerate(getattr(self.model, kind)):
                if i in removed:
                    continue
                part = "attentions" if getattr(block, "attentions", None) is not None else "resnets"
                kept = plan.kept.get(f"{kind}.{i}.{part}", list(range(len(getattr(block, part)))))
                names.append(f"{kind}.{i}.{part}.{kept[-1]}")
        return names

    def fix_pruned_widths(self, heads: dict[nn.Module, int]) -> None:
        """Also the resamplers' ``channels``/``out_channels``, which their forwards assert the input against."""
        from diffusers.models.downsampling import Downsample2D
        from diffusers.models.upsampling import Upsample2D

        super().fix_pruned_widths(heads)
        for module in self.model.modules():
            if isinstance(module, (Downsample2D, Upsample2D)) and getattr(module, "conv", None) is not None:
                module.channels, module.out_channels = module.conv.in_channels, module.conv.out_channels


class UNet2DConditionAdapter(_UNetAdapter):
    model_class = "UNet2DConditionModel"


class UNet2DAdapter(_UNetAdapter):
    model_class = "UNet2DModel"
