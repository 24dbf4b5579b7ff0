"""Reference multi-scale deformable sampling (the test oracle).

Deformable-DETR's semantics, written with ``F.grid_sample`` one level at a time. It is exact but slow and
memory hungry; the library calls :func:`comfy_mm_interleaved.ops.ms_deform_attn`, which dispatches to the
compiled gather fallback (CPU) or the Triton kernel (CUDA). Keep this file free of cleverness: it is the
definition the fast paths are tested against.

Shapes (N batch, S = sum_l H_l*W_l, M heads, D channels per head, Lq queries, L levels, P points):
    value               [N, S, M, D]
    spatial_shapes      [L, 2]  rows (H_l, W_l)
    sampling_locations  [N, Lq, M, L, P, 2]  (x, y) in [0, 1] of the map extent
    attention_weights   [N, Lq, M, L, P]
    returns             [N, Lq, M * D]  (head-major)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor | Sequence[Sequence[int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    shapes = [
        (int(h), int(w)) for h, w in (spatial_shapes.tolist() if torch.is_tensor(spatial_shapes) else spatial_shapes)
    ]
    value_levels = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]; align_corners=False gives loc*W - 0.5
    samples = []
    for level, (h, w) in enumerate(shapes):
        # [N, H*W, M, D] -> [N*M, D, H, W]
        v = value_levels[level].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]
        g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        samples.append(F.grid_sample(v, g.to(v.dtype), mode="bilinear", padding_mode="zeros", align_corners=False))
    # [N*M, D, Lq, L, P]
    stacked = torch.stack(samples, dim=-2)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, n_levels, n_points)
    out = (stacked * weights.to(stacked.dtype)).sum(dim=(-1, -2))  # [N*M, D, Lq]
    return out.view(n, m * d, lq).transpose(1, 2).contiguous()
