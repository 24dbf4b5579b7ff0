"""Gather fallback of the deformable-sampling op: exact, vectorised over levels, ``torch.compile``-able.

Every bilinear tap (query, head, level, point, corner) becomes one row index into ``value`` viewed as
``[N*S*M, D]`` and one weight ``attention * bilinear * in-bounds``; ``F.embedding_bag(mode="sum")`` then forms the
weighted sums without materialising the ``[..., 4*L*P, D]`` gathered tensor. Level sizes are read from the
``spatial_shapes`` tensor arithmetically (no Python loop over levels, no ``.item()``), so the functions trace
with ``fullgraph=True`` and dynamic shapes.

The backward is written by hand (the ``embedding_bag`` backward that autograd would run is slow on a CPU):

* ``grad_value`` is the transposed gather: the taps sorted by row, then one ``embedding_bag`` whose bags are the
  rows of ``value`` and whose entries are the output-gradient rows of the taps' queries, weighted as in the forward;
* ``tap_dot = value[row] . grad_out[query]`` per tap (a chunked gather, or one fused loop under ``torch.compile``)
  gives ``grad_attention = sum_corners bilinear * tap_dot`` and the location gradients by the chain rule on the
  bilinear weights (``floor`` has zero derivative, so at pixel-centre kinks the location gradient is the
  right-sided one, as ``grid_sample``'s).

``MMI_MSDA_COMPILE=1`` makes the op's CPU implementation use ``torch.compile`` of these functions (compiled
lazily on first use and cached by torch; see docs/KERNELS_DESIGN.md for the measured compile time).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

# gathered rows held at once by the eager backward's tap dot products (two buffers of 2 MiB in fp32 at D = 64)
_DOT_CHUNK_ROWS = 8192


@dataclass(frozen=True)
class TapLayout:
    """Where the level and corner axes of the tap tensors lie.

    * eager (``level_first``): corner- and level-major, taps ``[4, L, N, Lq, M, P]`` and per-point tensors
      ``[L, N, Lq, M, P]``, so that every elementwise step runs over long contiguous rows and the per-level tables
      broadcast over leading axes (on the op's own layout, whose inner axes are small, eager PyTorch is about twice
      as slow);
    * under ``torch.compile``: the op's layout, taps ``[N, Lq, M, L, P, 4]`` and per-point ``[N, Lq, M, L, P]``,
      which inductor fuses into loops that write the embedding-bag rows directly (the permuted layout would cost
      it an extra strided copy).
    """

    level_first: bool

    @property
    def corner_dim(self) -> int:
        return 0 if self.level_first else -1

    def stack_corners(self, corners: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(corners, dim=self.corner_dim)

    def corners(self, taps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return taps.unbind(self.corner_dim)

    def per_level(self, table: torch.Tensor) -> torch.Tensor:
        """A per-level vector [L] -> broadcastable against the per-point tensors."""
        return table.view(-1, 1, 1, 1, 1) if self.level_first else table.view(-1, 1)

    def per_point(self, t: torch.Tensor) -> torch.Tensor:
        """The op's [N, Lq, M, L, P, ...] -> the per-point layout (contiguous when level-first)."""
        return level_major(t) if self.level_first else t

    def per_tap(self, per_point: torch.Tensor) -> torch.Tensor:
        """A per-point tensor (:meth:`per_point`) -> broadcastable against the taps."""
        return per_point if self.level_first else per_point[..., None]

    def to_op_layout(self, t: torch.Tensor) -> torch.Tensor:
        """A per-point tensor (with trailing axes) -> the op's [N, Lq, M, L, P, ...], contiguous."""
        return t.movedim(0, 3).contiguous() if self.level_first else t


class Taps(NamedTuple):
    """The bilinear taps of every (query, head, level, point, corner), laid out as ``layout`` says. Corners in the
    order (x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1), where (x0, y0) is the pixel at or left of /
    above the sampling point."""

    rows: torch.Tensor  # rows of value.view(N*S*M, D) (int32 when they fit); 0 outside the map
    inside: torch.Tensor  # bool, the corner lies on the map
    fx: torch.Tensor  # per point: fractional pixel position, in [0, 1)
    fy: torch.Tensor
    layout: TapLayout

    def bilinear(self) -> torch.Tensor:
        """Bilinear weight of each tap, 0 outside the map."""
        gx, gy = 1 - self.fx, 1 - self.fy
        return self.layout.stack_corners([gx * gy, self.fx * gy, gx * self.fy, self.fx * self.fy]) * self.inside

    def bags(self, t: torch.Tensor) -> torch.Tensor:
        """A per-tap tensor -> [N * Lq * M, 4 * L * P]: one row (an embedding bag) per (query, head), its taps in
        any order."""
        if not self.layout.level_first:  # [N, Lq, M, L, P, 4]
            return t.reshape(-1, math.prod(t.shape[3:]))
        corners, levels, n, lq, m, points = t.shape
        return t.permute(2, 3, 4, 0, 1, 5).reshape(n * lq * m, corners * levels * points)

    def bag_of_tap(self, tap: torch.Tensor) -> torch.Tensor:
        """Flat indices into the taps -> the (query, head) bag of each."""
        shape = self.rows.shape
        if not self.layout.level_first:  # [N, Lq, M, L, P, 4]
            return tap // math.prod(shape[3:])
        return (tap // shape[-1]) % math.prod(shape[2:5])  # [4, L, N, Lq, M, P]


def level_major(t: torch.Tensor) -> torch.Tensor:
    """[N, Lq, M, L, P, ...] -> contiguous [L, N, Lq, M, P, ...]."""
    return t.movedim(3, 0).contiguous()


def bilinear_taps(
    value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, sampling_locations: torch.Tensor
) -> Taps:
    """value [N, S, M, D], spatial_shapes [L, 2] (H, W), level_start_index [L], sampling_locations
    [N, Lq, M, L, P, 2] (x, y) -> the taps (pixel = loc * size - 0.5, zero padding), level-first unless compiling."""
    n, s, m, _ = value.shape
    dtype = sampling_locations.dtype
    index = torch.int32 if n * s * m < 2**31 else torch.int64  # int32 rows sort twice as fast
    layout = TapLayout(level_first=not torch.compiler.is_compiling())
    loc = layout.per_point(sampling_locations)
    if layout.level_first:
        batch_shape, head_shape = (1, n, 1, 1, 1), (1, 1, 1, m, 1)
    else:
        batch_shape, head_shape = (n, 1, 1, 1, 1), (m, 1, 1)
    heights = layout.per_level(spatial_shapes[:, 0].to(index))
    widths = layout.per_level(spatial_shapes[:, 1].to(index))
    # pixel coordinates, clamped to [-2, size]: far-out and non-finite points (NaN, inf) get four corners off the
    # map, so they add exactly 0 with finite weights, as the official kernel skips them, and the integer conversion
    # stays small; the clamp changes no point with a corner on the map
    x = (loc[..., 0] * widths.to(dtype) - 0.5).nan_to_num(nan=-2.0).clamp(min=-2.0).minimum(widths.to(dtype))
    y = (loc[..., 1] * heights.to(dtype) - 0.5).nan_to_num(nan=-2.0).clamp(min=-2.0).minimum(heights.to(dtype))
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    ix, iy = x0.to(index), y0.to(index)
    in_x0, in_x1 = (ix >= 0) & (ix < widths), (ix >= -1) & (ix < widths - 1)
    in_y0, in_y1 = (iy >= 0) & (iy < heights), (iy >= -1) & (iy < heights - 1)
    inside = layout.stack_corners([in_x0 & in_y0, in_x1 & in_y0, in_x0 & in_y1, in_x1 & in_y1])
    batch = torch.arange(n, device=value.device, dtype=index).view(batch_shape)
    head = torch.arange(m, device=value.device, dtype=index).view(head_shape)
    top_left = (batch * s + layout.per_level(level_start_index.to(index)) + iy * widths + ix) * m + head
    if not layout.level_first:
        top_left = top_left[..., None]
    corner_offset = layout.stack_corners([torch.zeros_like(widths), torch.ones_like(widths), widths, widths + 1]) * m
    rows = torch.where(inside, top_left + corner_offset, 0)  # row 0 outside the map
    return Taps(rows, inside, fx, fy, layout)


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
    n, _, m, d = value.shape
    lq = sampling_locations.shape[1]
    taps = bilinear_taps(value, spatial_shapes, level_start_index, sampling_locations)
    weights = taps.bags(taps.layout.per_tap(taps.layout.per_point(attention_weights)) * taps.bilinear())
    rows = taps.bags(taps.rows)
    del taps  # peak memory: the taps in one layout at a time (eagerly the bags are a permuted copy)
    out = F.embedding_bag(rows, value.reshape(-1, d), per_sample_weights=weights, mode="sum")
    return out.view(n, lq, m * d)


def tap_dots(table: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, bags: torch.Tensor) -> torch.Tensor:
    """table [R, D], grad [B, D], rows and bags [T] (int64) -> [T]: ``table[rows[t]] . grad[bags[t]]``.

    Traced by ``torch.compile``, the gathers, product and sum fuse into one loop; eagerly, a few thousand taps are
    gathered at a time into reused buffers (a whole ``[T, D]`` gather would be slow and large). Rows in ascending
    order make the table reads sequential."""
    if torch.compiler.is_compiling():
        return (table[rows] * grad[bags]).sum(-1)
    out = table.new_empty(rows.shape[0])
    table_rows = table.new_empty(min(_DOT_CHUNK_ROWS, rows.shape[0]), table.shape[1])
    grad_rows = torch.empty_like(table_rows)
    for start in range(0, rows.shape[0], _DOT_CHUNK_ROWS):
        stop = min(start + _DOT_CHUNK_ROWS, rows.shape[0])
        a, b = table_rows[: stop - start], grad_rows[: stop - start]
        torch.index_select(table, 0, rows[start:stop], out=a)
        torch.index_select(grad, 0, bags[start:stop], out=b)
        torch.sum(a.mul_(b), -1, out=out[start:stop])
    return out


def ms_deform_attn_gather_backward(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    grad_output: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (value, sampling_locations, attention_weights) of :func:`ms_deform_attn_gather`."""
    n, s, m, d = value.shape
    taps = bilinear_taps(value, spatial_shapes, level_start_index, sampling_locations)
    table = value.reshape(-1, d)  # [N*S*M, D]
    grad = grad_output.reshape(-1, d)  # [N*Lq*M, D], one row per (query, head) bag
    attention = taps.layout.per_point(attention_weights)
    weights = taps.layout.per_tap(attention) * taps.bilinear()
    # the transposed gather: taps sorted by row, one embedding_bag whose bags are the rows of value
    sorted_rows, order = taps.rows.reshape(-1).sort()
    bags = taps.bag_of_tap(order)  # the (query, head) of each sorted tap
    counts = torch.zeros(n * s * m, dtype=torch.long, device=value.device)
    counts.index_add_(0, sorted_rows, torch.ones_like(order))
    offsets = counts.cumsum(0) - counts  # where each row's taps start in the sorted order
    grad_value = F.embedding_bag(bags, grad, offsets, per_sample_weights=weights.reshape(-1)[order], mode="sum")

    dots_sorted = tap_dots(table, sorted_rows, grad, bags)
    dots = torch.empty_like(dots_sorted).scatter_(0, order, dots_sorted).view_as(weights)
    d00, d10, d01, d11 = taps.layout.corners(dots * taps.inside)  # d out / d (bilinear weight) per corner
    fx, fy = taps.fx, taps.fy
    grad_attn = (d00 * (1 - fx) + d10 * fx) * (1 - fy) + (d01 * (1 - fx) + d11 * fx) * fy
    # chain rule through the bilinear weights; pixel x = loc_x * W - 0.5 (floor has zero derivative)
    widths = taps.layout.per_level(spatial_shapes[:, 1].to(fx.dtype))
    heights = taps.layout.per_level(spatial_shapes[:, 0].to(fx.dtype))
    grad_x = ((d10 - d00) * (1 - fy) + (d11 - d01) * fy) * widths
    grad_y = ((d01 - d00) * (1 - fx) + (d11 - d10) * fx) * heights
    grad_loc = torch.stack([grad_x, grad_y], dim=-1) * attention[..., None]
    return grad_value.view_as(value), taps.layout.to_op_layout(grad_loc), taps.layout.to_op_layout(grad_attn)


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
