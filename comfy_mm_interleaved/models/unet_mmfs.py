"""MMFSNet: ControlNet-style MMFS residuals for the diffusion UNet (OFFICIAL_MODEL.md section 2.4).

After the UNet's mid block, every down-path skip tensor (the ``conv_in`` output, then every resnet and
downsampler output) and the mid-block output get a residual from their own :class:`MMFSBlock`, which
attends (deformably, over 4 pyramid levels) to the features of ONE source image: the image just before the
one being generated. The up path then consumes the modified skips.

The per-block value projections depend only on the source image, so :meth:`MMFSNet.prepare` computes them
once per image decode and returns an :class:`MMFSNetContext` that every diffusion step reuses.
:func:`unet_forward_with_mmfs` runs a stock diffusers ``UNet2DConditionModel`` with the residuals threaded
through, reusing the UNet's own submodules (no patching of diffusers).

MMFS ablation: an :class:`MMFSNet` whose ``mmfs_enabled`` attribute is False adds no residual at all (not even
the null-slot one), so the UNet runs as if it had no MMFSNet (see :mod:`.ablation`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.utils.checkpoint
from diffusers import UNet2DConditionModel
from torch import nn

from ..config import ImageDecoderConfig
from .mmfs import MMFS
from .posembed import resize_grid_embedding, sincos_2d

SKIPS_PER_SCALE = 3  # official rule: block k uses base spatial shape spatial_shapes[k // 3]


def _per_block(value: int | Sequence[int], n_blocks: int) -> list[int]:
    return [value] * n_blocks if isinstance(value, int) else list(value)


def unet_skip_channels(unet_config: dict[str, Any]) -> list[int]:
    """Channels of the down-path skip tensors of a ``UNet2DConditionModel`` config, in the order the up path
    consumes them in reverse: conv_in, then per down block its resnet outputs and (except the last) its downsampler.
    """
    channels = list(unet_config["block_out_channels"])
    layers = _per_block(unet_config.get("layers_per_block", 2), len(channels))
    skips = [channels[0]]
    for i, (out_channels, n_layers) in enumerate(zip(channels, layers)):
        skips += [out_channels] * n_layers
        if i < len(channels) - 1:
            skips.append(out_channels)
    return skips


def check_sd_family_unet(unet: UNet2DConditionModel) -> None:
    """:func:`unet_forward_with_mmfs` covers the SD-1.x/2.x UNet family; reject configs it does not thread."""
    cfg = unet.config
    unsupported = {
        "class embeddings (num_class_embeds / class_embed_type)": unet.class_embedding is not None,
        "addition_embed_type": cfg.addition_embed_type is not None,
        "encoder_hid_proj": unet.encoder_hid_proj is not None,
        "GLIGEN attention_type": getattr(cfg, "attention_type", "default") != "default",
        "a UNet without mid block": unet.mid_block is None,
    }
    bad = [name for name, flag in unsupported.items() if flag]
    if bad:
        raise ValueError(f"MMFSNet supports SD-family UNet2DConditionModel configs only; this one uses {bad}")


def pixel_centres(height: int, width: int, device: torch.device) -> torch.Tensor:
    """Reference points [1, h*w, 1, 2] (fp32): (x, y) = ((j + 0.5) / W, (i + 0.5) / H), row-major over (i, j)."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], -1)[None, :, None]


@dataclass
class MMFSNetContext:
    """Source-image features prepared once per decode and reused at every diffusion step.

    values: per block (12 down + mid) the projected values [B, S, heads, head_dim], or None when no batch entry
    has a source image (then every block takes the exact null-slot shortcut); spatial_shapes [L, 2] (H, W) long;
    level_start_index [L] long; mask [B, 1] (1 = the source image is visible).
    """

    values: list[torch.Tensor] | None
    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor
    mask: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    def repeat_batch(self, times: int) -> MMFSNetContext:
        """The context for a batch stacked ``times`` times (e.g. the [negative, conditional] CFG batch)."""
        values = None if self.values is None else [torch.cat([v] * times) for v in self.values]
        return replace(self, values=values, mask=torch.cat([self.mask] * times))


class MMFSBlock(nn.Module):
    """One skip tensor's MMFS: LayerNorm'd pixels (+ fixed 2-D sin-cos position) query the source image's pyramid;
    the output goes through a zero-initialised 1x1 conv and is added to the skip tensor."""

    def __init__(
        self,
        query_dim: int,
        feature_dim: int,
        value_dim: int,
        n_heads: int,
        n_points: int,
        spatial_shapes: Sequence[int],
        base_spatial_shape: int,
        grid_size: int,
        max_num_images: int,
        offset_init_magnitude: float,
    ) -> None:
        super().__init__()
        self.gradient_checkpointing = False
        # fixed table, stored in the checkpoint (requires_grad False as official)
        self.pos_embed = nn.Parameter(sincos_2d(query_dim, grid_size), requires_grad=False)  # [g*g, C]
        self.query_norm = nn.LayerNorm(query_dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(feature_dim, eps=1e-6)
        self.mmfs = MMFS(
            d_query=query_dim,
            d_value=feature_dim,
            d_out=query_dim,
            value_dim=value_dim,
            n_levels=len(spatial_shapes),
            n_heads=n_heads,
            n_points=n_points,
            spatial_shapes=spatial_shapes,
            base_spatial_shape=base_spatial_shape,
            max_num_images=max_num_images,
            offset_init_magnitude=offset_init_magnitude,
        )
        self.conv = nn.Conv2d(query_dim, query_dim, kernel_size=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def project_values(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, 1, S, feature_dim] -> values [B, S, heads, head_dim]."""
        return self.mmfs.project_values(self.feat_norm(features))

    def _residual(self, sample: torch.Tensor, context: MMFSNetContext, values: torch.Tensor) -> torch.Tensor:
        b, c, h, w = sample.shape
        query = self.query_norm(sample.flatten(2).transpose(1, 2))  # [B, h*w, C]
        query = query + resize_grid_embedding(self.pos_embed, h, w).to(query.dtype)
        ref = pixel_centres(h, w, sample.device)
        out = self.mmfs(query, ref, None, context.spatial_shapes, context.level_start_index, context.mask, values)
        return self.conv(out.transpose(1, 2).reshape(b, c, h, w))

    def null_residual(self, sample: torch.Tensor) -> torch.Tensor:
        """Residual when no image is visible: the null slot (value ``ignore_token``) gets all the attention, so the
        MMFS output is output_proj(ignore_token) at every pixel. Exact (the masked logits underflow to 0)."""
        null = self.mmfs.output_proj(self.mmfs.ignore_token.reshape(1, -1).to(sample.dtype))  # [1, C]
        return self.conv(null[:, :, None, None]).expand_as(sample)

    def forward(self, sample: torch.Tensor, context: MMFSNetContext, values: torch.Tensor | None) -> torch.Tensor:
        """sample [B, C, h, w] -> residual [B, C, h, w]."""
        if values is None:
            return self.null_residual(sample)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._residual, sample, context, values, use_reentrant=False)
        return self._residual(sample, context, values)


class MMFSNet(nn.Module):
    """``mmfs_down_blocks`` (one per UNet skip tensor) + ``mmfs_mid_block``; keys as the official checkpoint.

    ``mmfs_enabled`` (not a weight; True by default): False makes :meth:`forward` return its inputs unchanged
    (MMFS ablation).
    """

    def __init__(self, config: ImageDecoderConfig, feature_dim: int) -> None:
        super().__init__()
        mmfs = config.mmfs
        factor = config.downsample_factor
        if factor < 1:
            raise ValueError(f"image_decoder.image_size {config.image_size} > 512 is not supported by MMFSNet")
        bases = [s // factor for s in mmfs.spatial_shapes]
        skip_channels = unet_skip_channels(config.unet)
        if len(skip_channels) > SKIPS_PER_SCALE * len(bases):
            raise ValueError(
                f"the UNet has {len(skip_channels)} skip tensors but the official base-shape rule covers only "
                f"{SKIPS_PER_SCALE * len(bases)} ({len(bases)} spatial shapes x {SKIPS_PER_SCALE})"
            )
        self.feature_dim = feature_dim
        self.n_levels = len(mmfs.spatial_shapes)
        self.mmfs_enabled = True

        def block(channels: int, base: int) -> MMFSBlock:
            return MMFSBlock(
                query_dim=channels,
                feature_dim=feature_dim,
                value_dim=mmfs.value_dim,
                n_heads=mmfs.n_heads,
                n_points=mmfs.n_points,
                spatial_shapes=mmfs.spatial_shapes,
                base_spatial_shape=base,
                grid_size=mmfs.spatial_shapes[0] // factor,
                max_num_images=mmfs.max_num_images,
                offset_init_magnitude=mmfs.offset_init_magnitude,
            )

        self.mmfs_down_blocks = nn.ModuleList(
            block(c, bases[i // SKIPS_PER_SCALE]) for i, c in enumerate(skip_channels)
        )
        self.mmfs_mid_block = block(config.unet["block_out_channels"][-1], bases[-1])

    @property
    def blocks(self) -> list[MMFSBlock]:
        return [*self.mmfs_down_blocks, self.mmfs_mid_block]

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        for blk in self.blocks:
            blk.gradient_checkpointing = enabled

    # ------------------------------------------------------------------------------------------------------
    def prepare(self, features: Sequence[torch.Tensor] | None, mask: torch.Tensor) -> MMFSNetContext:
        """Project the source image's pyramid for every block, once per decode.

        features: ``n_levels`` maps [B, feature_dim, h_l, w_l] (the source image of each batch entry; anything,
        e.g. zeros, where mask is 0) or None when no entry has a source image; mask [B, 1] or [B] (1 = visible).
        """
        if mask.dim() == 1:
            mask = mask[:, None]
        if mask.dim() != 2 or mask.shape[1] != 1:
            raise ValueError(f"mmfs_mask must be [B, 1] or [B] (one source image per entry), got {tuple(mask.shape)}")
        batch = mask.shape[0]
        if features is None:
            if bool(mask.any()):
                raise ValueError("mmfs_mask marks source images as visible but no mmfs_features were given")
            shapes = torch.zeros(0, 2, dtype=torch.long, device=mask.device)
            return MMFSNetContext(None, shapes, shapes[:, 0], mask.new_zeros(batch, 1))
        device = features[0].device if len(features) else mask.device
        self._check_features(features, batch)
        shapes = torch.tensor([f.shape[-2:] for f in features], dtype=torch.long, device=device)  # [L, 2]
        starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
        mask = mask.to(device)
        if not bool(mask.any()):
            return MMFSNetContext(None, shapes, starts, mask)
        flat = torch.cat([f.flatten(2).transpose(1, 2) for f in features], dim=1)[:, None]  # [B, 1, S, C]
        values = [blk.project_values(flat) for blk in self.blocks]
        return MMFSNetContext(values, shapes, starts, mask)

    def _check_features(self, features: Sequence[torch.Tensor], batch: int) -> None:
        if len(features) != self.n_levels:
            raise ValueError(f"MMFSNet expects {self.n_levels} feature maps (pyramid levels), got {len(features)}")
        for level, feat in enumerate(features):
            if feat.dim() != 4 or feat.shape[0] != batch or feat.shape[1] != self.feature_dim:
                raise ValueError(
                    f"mmfs feature level {level} must be [B={batch}, C={self.feature_dim}, h, w], "
                    f"got {tuple(feat.shape)}"
                )

    def forward(
        self,
        mid_sample: torch.Tensor,
        skips: Sequence[torch.Tensor],
        context: MMFSNetContext,
        trace: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Add each block's residual to its skip tensor and to the mid-block output.

        mid_sample [B, C_mid, h, w]; skips: the UNet's down-path skip tensors. With ``trace`` the block inputs
        and residuals are stored under ``down{k}.input`` / ``down{k}.residual`` / ``mid.input`` / ``mid.residual``.
        Switched off (``mmfs_enabled`` False) it returns ``mid_sample`` and ``skips`` unchanged and traces nothing.
        """
        if len(skips) != len(self.mmfs_down_blocks):
            raise ValueError(f"MMFSNet has {len(self.mmfs_down_blocks)} down blocks but got {len(skips)} skips")
        if context.batch_size != mid_sample.shape[0]:
            raise ValueError(
                f"MMFS context batch {context.batch_size} != UNet batch {mid_sample.shape[0]}; "
                "use MMFSNetContext.repeat_batch for classifier-free guidance"
            )
        if not self.mmfs_enabled:
            return mid_sample, list(skips)
        values = context.values or [None] * len(self.blocks)
        names = [f"down{k}" for k in range(len(skips))] + ["mid"]
        outputs = []
        for name, blk, sample, vals in zip(names, self.blocks, [*skips, mid_sample], values):
            residual = blk(sample, context, vals)
            if trace is not None:
                trace[f"{name}.input"], trace[f"{name}.residual"] = sample, residual
            outputs.append(sample + residual)
        return outputs[-1], outputs[:-1]


def unet_forward_with_mmfs(
    unet: UNet2DConditionModel,
    sample: torch.Tensor,
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor,
    mmfs: MMFSNet | None = None,
    context: MMFSNetContext | None = None,
    trace: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """SD ``UNet2DConditionModel`` forward (diffusers semantics) with MMFSNet applied after the mid block.

    sample [B, C_in, h, w]; timestep scalar or [B]; encoder_hidden_states [B, S, D] -> ε-prediction [B, C_out, h, w].
    Only the SD-family path is threaded (see :func:`check_sd_family_unet`).
    """
    up_factor = 2**unet.num_upsamplers
    forward_upsample_size = any(s % up_factor != 0 for s in sample.shape[-2:])
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0

    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)

    hidden = unet.conv_in(sample)
    skips = [hidden]
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            hidden, res = block(hidden_states=hidden, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            hidden, res = block(hidden_states=hidden, temb=emb)
        skips.extend(res)

    if getattr(unet.mid_block, "has_cross_attention", False):
        hidden = unet.mid_block(hidden, emb, encoder_hidden_states=encoder_hidden_states)
    else:
        hidden = unet.mid_block(hidden, emb)

    if mmfs is not None:
        if context is None:
            raise ValueError("unet_forward_with_mmfs: pass the MMFSNetContext from MMFSNet.prepare with mmfs")
        hidden, skips = mmfs(hidden, skips, context, trace)

    upsample_size = None
    for i, block in enumerate(unet.up_blocks):
        n_res = len(block.resnets)
        res, skips = tuple(skips[-n_res:]), skips[:-n_res]
        if i < len(unet.up_blocks) - 1 and forward_upsample_size:
            upsample_size = skips[-1].shape[2:]
        kwargs: dict[str, Any] = dict(hidden_states=hidden, temb=emb, res_hidden_states_tuple=res)
        if getattr(block, "has_cross_attention", False):
            kwargs["encoder_hidden_states"] = encoder_hidden_states
        hidden = block(**kwargs, upsample_size=upsample_size)

    if unet.conv_norm_out is not None:
        hidden = unet.conv_act(unet.conv_norm_out(hidden))
    return unet.conv_out(hidden)
