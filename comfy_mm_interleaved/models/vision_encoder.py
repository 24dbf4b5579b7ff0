"""CLIP ViT + ViT-Adapter: the image encoder of MM-Interleaved (OFFICIAL_MODEL.md section 1.1).

The CLIP parts are transformers' own building blocks (``CLIPVisionEmbeddings``, ``CLIPEncoderLayer``), with no
``post_layernorm``; the adapter parts live beside them in ``vision_model`` under ``adapter_*`` names, exactly as in
the official checkpoint (``visual_tokenizer.encoder.vision_model.*``).

    pixels [B, 3, S, S] (CLIP-normalised)
      -> patch tokens + CLS -> pre_layrnorm                                  [B, 1 + g*g, C]
      -> spatial prior module on the image resized to 16g x 16g            c1 (4g), c2 (2g), c3 (g), c4 (g/2)
      -> per layer group: inject c2..c4 into the ViT tokens, run the group's ViT layers, extract back into c
      -> c1 += up(c2); every level += the group's ViT output resized to it (groups 1..4 -> levels 1..4)
    outputs: last_hidden_state [B, 1 + g*g, C] (raw output of the last ViT layer), 4 maps [B, C, 4g..g/2]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import CLIPVisionConfig
from transformers.models.clip.modeling_clip import CLIPEncoderLayer, CLIPVisionEmbeddings

from ..config import VisionEncoderConfig
from .vit_adapter import InteractionBlock, SpatialPriorModule, level_layout, pixel_centre_reference_points

SPM_TOKENS_PER_PATCH = 16  # the spatial prior module sees the image at 16 px per ViT patch (224 -> 256 for g = 16)


def clip_vision_config(config: VisionEncoderConfig) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=config.num_channels,
        hidden_act=config.hidden_act,
        layer_norm_eps=config.layer_norm_eps,
        attention_dropout=0.0,
        attn_implementation="sdpa",
    )


class CLIPEmbeddingsWithPositionIds(CLIPVisionEmbeddings):
    """transformers registers ``position_ids`` as a non-persistent buffer; the official checkpoint stores it
    ([1, 1 + g*g] int64), so it is re-registered as persistent and ``load_state_dict(strict=True)`` sees it."""

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__(config)
        self.register_buffer("position_ids", self.position_ids, persistent=True)


class CLIPEncoderLayers(nn.Module):
    """Holds ``layers.N`` (the CLIP ``encoder``); the adapter runs them group by group."""

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))


def _check_interaction_indexes(config: VisionEncoderConfig) -> None:
    """The 4 pyramid levels take the outputs of 4 consecutive ViT layer groups that cover every layer."""
    groups = [tuple(group) for group in config.interaction_indexes]
    bounds = [0] + [last + 1 for _, last in groups]
    consecutive = all(first == start and last >= first for (first, last), start in zip(groups, bounds))
    if len(groups) != 4 or not consecutive or bounds[-1] != config.num_hidden_layers:
        raise ValueError(
            f"interaction_indexes {config.interaction_indexes} must split the {config.num_hidden_layers} ViT layers "
            f"into 4 consecutive [first, last] groups covering 0..{config.num_hidden_layers - 1} "
            "(the official ViT-L/14 uses [[0, 5], [6, 11], [12, 17], [18, 23]])"
        )


class CLIPVisionAdapterTransformer(nn.Module):
    """The official ``vision_model``: CLIP embeddings / pre-LN / layers and the ``adapter_*`` modules."""

    def __init__(self, config: VisionEncoderConfig) -> None:
        super().__init__()
        _check_interaction_indexes(config)
        clip = clip_vision_config(config)
        dim = config.hidden_size
        self.embeddings = CLIPEmbeddingsWithPositionIds(clip)
        self.pre_layrnorm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoderLayers(clip)
        self.adapter_level_embed = nn.Parameter(torch.zeros(3, dim))
        self.adapter_spm = SpatialPriorModule(config.conv_inplane, dim)
        n_groups = len(config.interaction_indexes)
        self.adapter_interactions = nn.ModuleList(
            InteractionBlock(
                dim,
                config.deform_num_heads,
                config.n_points,
                config.deform_ratio,
                config.cffn_ratio,
                config.init_values,
                n_extra_extractors=config.n_extra_extractors if i == n_groups - 1 else 0,
            )
            for i in range(n_groups)
        )
        self.adapter_up = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
        self._zero_adapter_linear_biases()

    def _zero_adapter_linear_biases(self) -> None:
        """The official model's transformers ``post_init`` zeroes every Linear bias of the (freshly built)
        adapter, the deformable sampling-offset biases included; the released training started from there."""
        for name, module in self.named_modules():
            if name.startswith("adapter") and isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)


@dataclass
class VisionEncoderOutput:
    last_hidden_state: torch.Tensor  # [B, 1 + g*g, C]
    multiscale_features: list[torch.Tensor]  # [B, C, 4g, 4g], [B, C, 2g, 2g], [B, C, g, g], [B, C, g/2, g/2]


class VisionEncoder(nn.Module):
    """CLIP ViT + ViT-Adapter (``visual_tokenizer.encoder``). Input: CLIP-normalised pixels [B, 3, S, S]."""

    def __init__(self, config: VisionEncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = CLIPVisionAdapterTransformer(config)
        self.gradient_checkpointing = config.gradient_checkpointing

    def _call(self, fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, pixel_values: torch.Tensor) -> VisionEncoderOutput:
        vm = self.vision_model
        grid = self.config.grid_size
        device = pixel_values.device

        hidden = vm.pre_layrnorm(vm.embeddings(pixel_values))  # [B, 1 + g*g, C]
        cls, x = hidden[:, :1], hidden[:, 1:]

        spm_size = grid * SPM_TOKENS_PER_PATCH
        spm_input = F.interpolate(pixel_values, size=(spm_size, spm_size), mode="bilinear", align_corners=False)
        c1, *levels = vm.adapter_spm(spm_input.to(hidden.dtype))
        level_shapes = [tuple(level.shape[-2:]) for level in levels]  # (2g, 2g), (g, g), (g/2, g/2)
        c = torch.cat(
            [level.flatten(2).transpose(1, 2) + vm.adapter_level_embed[i] for i, level in enumerate(levels)], dim=1
        )  # [B, sum H*W, C]

        vit_shape = [(grid, grid)]
        inject_refs = pixel_centre_reference_points(vit_shape, device)  # ViT tokens sample the 3 adapter levels
        inject_layout = level_layout(level_shapes, device)
        extract_refs = pixel_centre_reference_points(level_shapes, device)  # adapter tokens sample the ViT grid
        extract_layout = level_layout(vit_shape, device)

        group_maps = []
        for block, (first, last) in zip(vm.adapter_interactions, self.config.interaction_indexes):
            x = self._call(block.injector, x, inject_refs, c, inject_layout)
            hidden = torch.cat([cls, x], dim=1)
            for layer in vm.encoder.layers[first : last + 1]:
                hidden = self._call(layer, hidden, None)
            cls, x = hidden[:, :1], hidden[:, 1:]
            for extractor in block.extractors():
                c = self._call(extractor, c, extract_refs, x, extract_layout, level_shapes)
            group_maps.append(x.transpose(1, 2).unflatten(-1, (grid, grid)))  # [B, C, g, g]

        c2, c3, c4 = (
            tokens.transpose(1, 2).unflatten(-1, shape)
            for tokens, shape in zip(c.split([h * w for h, w in level_shapes], dim=1), level_shapes)
        )
        c1 = vm.adapter_up(c2) + c1
        multiscale = [
            level + _resize_bilinear(group_map, level.shape[-2:])
            for level, group_map in zip((c1, c2, c3, c4), group_maps)
        ]
        return VisionEncoderOutput(last_hidden_state=hidden, multiscale_features=multiscale)


def _resize_bilinear(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
