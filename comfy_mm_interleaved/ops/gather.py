"""Gather fallback of the deformable-sampling op: exact, vectorised over levels, ``torch.compile``-able.

Every bilinear tap (query, head, level, point, corner) becomes one row index into ``value`` viewed as
``[N*S*M, D]`` and one weight ``attention * bilinear * in-bounds``; ``F.embedding_bag(mode="sum")`` then forms the
weighted sums without materialising the ``[..., 4*L*P, D]`` gathered tensor. Level sizes are read from the
``spatial_shapes`` tensor arithmetically (no Python loop over levels, no ``.item()``), so the function traces
with ``fullgraph=True`` and dynamic shapes. Gradients come from autograd (``floor`` has zero derivative, so the
location gradient is the right-sided one at pixel-centre kinks, as ``grid_sample``'s).

``MMI_MSDA_COMPILE=1`` makes the op's CPU implementation use ``torch.compile`` of these functions (compiled
lazily on first use and cached by torch; see docs/KERNELS_DESIGN.md for the measured compile time).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

# tap order: (x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)
_CORNER_DX = (0.0, 1.0, 0.0, 1.0)
_CORNER_DY = (0.0, 0.0, 1.0, 1.0)


def ms_deform_attn_gather(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """value [N, S, M, D], spatial_shapes [L, 2] (H, W), level_start_index [L], sampling_locations
    [N, Lq, M, L, P, 2] (x, y), attention_weights [N, Lq, M, L, P] -> [N, Lq, M*D].

    All floating inputs must share one dtype (the compute dtype); the caller casts.
    """
    n, s, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    dtype = sampling_locations.dtype
    heights = spatial_shapes[:, 0].view(n_levels, 1, 1)  # [L, 1, 1] broadcast against [..., L, P, 4]
    widths = spatial_shapes[:, 1].view(n_levels, 1, 1)
    x = sampling_locations[..., 0, None] * widths.to(dtype) - 0.5  # [N, Lq, M, L, P, 1] pixel coordinates
    y = sampling_locations[..., 1, None] * heights.to(dtype) - 0.5
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    corner_x = x0 + x0.new_tensor(_CORNER_DX)  # [N, Lq, M, L, P, 4]
    corner_y = y0 + y0.new_tensor(_CORNER_DY)
    inside = (corner_x >= 0) & (corner_x < widths) & (corner_y >= 0) & (corner_y < heights)
    weight_x = torch.cat([1 - fx, fx, 1 - fx, fx], dim=-1)
    weight_y = torch.cat([1 - fy, 1 - fy, fy, fy], dim=-1)
    weights = attention_weights[..., None] * weight_x * weight_y * inside

    pixel = (
        level_start_index.view(n_levels, 1, 1)
        + torch.where(inside, corner_y, 0).long() * widths
        + torch.where(inside, corner_x, 0).long()
    )
    batch = torch.arange(n, device=value.device).view(n, 1, 1, 1, 1, 1)
    head = torch.arange(m, device=value.device).view(1, 1, m, 1, 1, 1)
    rows = (batch * s + pixel) * m + head  # [N, Lq, M, L, P, 4] rows of value.view(N*S*M, D)
    taps = n_levels * n_points * 4
    out = F.embedding_bag(
        rows.reshape(-1, taps), value.reshape(-1, d), per_sample_weights=weights.reshape(-1, taps), mode="sum"
    )
    return out.view(n, lq, m * d)


def ms_deform_attn_gather_backward(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    grad_output: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (value, sampling_locations, attention_weights) of :func:`ms_deform_attn_gather`."""

    def forward(v: torch.Tensor, loc: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        return ms_deform_attn_gather(v, spatial_shapes, level_start_index, loc, attn)

    _, pullback = torch.func.vjp(forward, value, sampling_locations, attention_weights)
    return pullback(grad_output)


def compile_requested() -> bool:
    return os.environ.get("MMI_MSDA_COMPILE", "0").strip().lower() in ("1", "true", "on", "yes")


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=True, fullgraph=True)


def gather_forward(*args: torch.Tensor) -> torch.Tensor:
    """:func:`ms_deform_attn_gather`, compiled when ``MMI_MSDA_COMPILE=1``."""
    return (_compiled(ms_deform_attn_gather) if compile_requested() else ms_deform_attn_gather)(*args)


def gather_backward(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`ms_deform_attn_gather_backward`, compiled when ``MMI_MSDA_COMPILE=1``."""
    fn = _compiled(ms_deform_attn_gather_backward) if compile_requested() else ms_deform_attn_gather_backward
    return fn(*args)
