"""Multi-scale deformable sampling: ``ms_deform_attn`` and its implementations."""

from __future__ import annotations

import torch

from .reference import ms_deform_attn_reference

__all__ = ["ms_deform_attn", "ms_deform_attn_reference"]


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Deformable-DETR multi-scale deformable attention core -> ``[N, Lq, M*D]``."""
    return ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights)
