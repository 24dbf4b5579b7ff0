"""Multi-scale deformable sampling: ``ms_deform_attn`` and its implementations.

* :func:`ms_deform_attn` — the public entry point: validates its inputs, then dispatches (see :mod:`.backend`).
* :func:`ms_deform_attn_reference` — the ``grid_sample`` oracle used by the tests.
* :func:`ms_deform_attn_gather` — the pure-PyTorch gather fallback (CPU default).
* ``torch.ops.comfy_mm_interleaved.ms_deform_attn`` — the custom op (Triton on CUDA, gather elsewhere).
"""

from __future__ import annotations

import torch

from .backend import backend_for
from .gather import ms_deform_attn_gather
from .msda_op import ms_deform_attn_op
from .reference import ms_deform_attn_reference
from .validation import check_msda_inputs

__all__ = ["ms_deform_attn", "ms_deform_attn_gather", "ms_deform_attn_op", "ms_deform_attn_reference"]


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Deformable-DETR multi-scale deformable sampling -> ``[N, Lq, M*D]`` (head-major), in value's dtype.

    value [N, S, M, D]; spatial_shapes [L, 2] (H, W) int; level_start_index [L] int; sampling_locations
    [N, Lq, M, L, P, 2] (x, y) with [0, 1] spanning each map (pixel = loc * size - 0.5, bilinear, zero padding);
    attention_weights [N, Lq, M, L, P]. Locations and weights are computed in float32 (float64 if any input is
    float64), whatever their own dtype; keep them in float32 for accuracy.
    """
    check_msda_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    float64 = torch.float64 in (value.dtype, sampling_locations.dtype, attention_weights.dtype)
    compute = torch.float64 if float64 else torch.float32
    sampling_locations = sampling_locations.to(compute)
    attention_weights = attention_weights.to(compute)
    if backend_for(value.device) == "reference":
        return ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights)
    return ms_deform_attn_op(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
