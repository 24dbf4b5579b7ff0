"""Triton kernels of the deformable-sampling op (Deformable-DETR semantics), forward and backward.

Layout (N batch, S pixels of all levels, M heads, D channels, Lq queries, L levels, P points):
    value [N, S, M, D] (fp32 / fp16 / bf16 / fp64), spatial_shapes [L, 2] (H, W) int32, level_start_index [L] int32,
    sampling_locations [N, Lq, M, L, P, 2] (x, y in [0, 1]), attention_weights [N, Lq, M, L, P] -> out [N, Lq, M*D].

One program per (block of BLOCK_Q queries, head, batch): grid ``(cdiv(Lq, BLOCK_Q), M, N)``, query blocks fastest
so that concurrently running programs share one (batch, head) value slice in L2. A program holds its
BLOCK_Q * BLOCK_P sampling rows as the rows of ``[R, BLOCK_D]`` tiles (D contiguous) and runs a loop over the
(image x level) axis. A tap at pixel (x * W - 0.5, y * H - 0.5) reads its four corners with two-sided bounds masks
(zero padding), which is exactly ``grid_sample(align_corners=False, padding_mode="zeros")``. Values are upcast
right after loading; arithmetic is in the compute dtype CDT (fp32, or fp64 for gradient checks), which is also
the dtype of locations, weights and all gradients but the value gradient's fp32 (or fp64) atomic buffer.

The shared helpers :func:`sample_level` and :func:`sample_level_backward` are also used by the fused MMFS kernels
(``mmfs.py``). No ``tl.make_block_ptr``, no inline asm, no bf16 arithmetic or atomics: runs on Triton 3.6-3.8 and
under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


# Kernel signatures and calls keep their arguments grouped by role, one group per line.
# fmt: off
# ---------------------------------------------------------------------------------------------------------------
# shared device helpers
@triton.jit
def _pixel_coordinates(x, y, height, width):
    """Normalised (x, y) [R] -> integer top-left corner (x0, y0) and fractions (fx, fy) of ``loc * size - 0.5``.

    Coordinates far outside the map are clamped to [-2, size + 1], where all four taps stay outside, so the integer
    conversion never overflows and value and gradient stay exactly zero.
    """
    px = tl.minimum(tl.maximum(x * width - 0.5, -2.0), width + 1.0)
    py = tl.minimum(tl.maximum(y * height - 0.5, -2.0), height + 1.0)
    x0f = tl.floor(px)
    y0f = tl.floor(py)
    return x0f.to(tl.int32), y0f.to(tl.int32), px - x0f, py - y0f


@triton.jit
def _corner_tile(v_ptr, xi, yi, height, width, start, stride_pix, d_offs, d_ok, row_ok, CDT: tl.constexpr):
    """Values [R, BLOCK_D] of the taps (xi, yi) [R] (zero outside the map), their mask and value-row offsets."""
    ok = row_ok & (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
    offs = (start + yi * width + xi) * stride_pix
    mask = ok[:, None] & d_ok[None, :]
    tile = tl.load(v_ptr + offs[:, None] + d_offs[None, :], mask=mask, other=0.0).to(CDT)
    return tile, mask, offs


@triton.jit
def sample_level(
    v_ptr, x, y, weight, height, width, start, stride_pix, d_offs, d_ok, row_ok, CDT: tl.constexpr
):
    """``weight * bilinear(value_level, (x, y))`` as an [R, BLOCK_D] tile; rows outside ``row_ok`` read nothing."""
    x0, y0, fx, fy = _pixel_coordinates(x, y, height, width)
    gx = 1.0 - fx
    gy = 1.0 - fy
    v00, _, _ = _corner_tile(v_ptr, x0, y0, height, width, start, stride_pix, d_offs, d_ok, row_ok, CDT)
    v01, _, _ = _corner_tile(v_ptr, x0 + 1, y0, height, width, start, stride_pix, d_offs, d_ok, row_ok, CDT)
    v10, _, _ = _corner_tile(v_ptr, x0, y0 + 1, height, width, start, stride_pix, d_offs, d_ok, row_ok, CDT)
    v11, _, _ = _corner_tile(v_ptr, x0 + 1, y0 + 1, height, width, start, stride_pix, d_offs, d_ok, row_ok, CDT)
    w00 = (weight * gx * gy)[:, None]
    w01 = (weight * fx * gy)[:, None]
    w10 = (weight * gx * fy)[:, None]
    w11 = (weight * fx * fy)[:, None]
    return w00 * v00 + w01 * v01 + w10 * v10 + w11 * v11


@triton.jit
def _corner_backward(
    v_ptr, gv_ptr, xi, yi, tap_weight, dwx, dwy, weight, go_rows, height, width, start, stride_pix, d_offs, d_ok,
    row_ok, CDT: tl.constexpr,
):
    """One tap's share of the backward: scatter ``weight * tap_weight * go`` into grad_value (fp32/fp64 atomics,
    skipped where the weight is exactly 0) and return ``(go . v) * (tap_weight, dwx, dwy)`` [R] for the sums."""
    tile, mask, offs = _corner_tile(v_ptr, xi, yi, height, width, start, stride_pix, d_offs, d_ok, row_ok, CDT)
    dot = tl.sum(tile * go_rows, axis=1)
    scatter = mask & (weight != 0.0)[:, None]
    contribution = (weight * tap_weight)[:, None] * go_rows
    tl.atomic_add(gv_ptr + offs[:, None] + d_offs[None, :], contribution, mask=scatter, sem="relaxed")
    return dot * tap_weight, dot * dwx, dot * dwy


@triton.jit
def sample_level_backward(
    v_ptr, gv_ptr, x, y, weight, go_rows, height, width, start, stride_pix, d_offs, d_ok, row_ok,
    CDT: tl.constexpr,
):
    """Backward of :func:`sample_level` for one level.

    Accumulates ``d/d value`` atomically and returns, per row [R]: ``go . sample`` (the gradient of ``weight``) and
    the gradients of the normalised ``x`` and ``y`` (``weight * (W, H) * go . d sample / d (fx, fy)``).
    """
    x0, y0, fx, fy = _pixel_coordinates(x, y, height, width)
    gx = 1.0 - fx
    gy = 1.0 - fy
    a00, x00, y00 = _corner_backward(
        v_ptr, gv_ptr, x0, y0, gx * gy, -gy, -gx, weight, go_rows, height, width, start, stride_pix, d_offs, d_ok,
        row_ok, CDT,
    )
    a01, x01, y01 = _corner_backward(
        v_ptr, gv_ptr, x0 + 1, y0, fx * gy, gy, -fx, weight, go_rows, height, width, start, stride_pix, d_offs,
        d_ok, row_ok, CDT,
    )
    a10, x10, y10 = _corner_backward(
        v_ptr, gv_ptr, x0, y0 + 1, gx * fy, -fy, gx, weight, go_rows, height, width, start, stride_pix, d_offs,
        d_ok, row_ok, CDT,
    )
    a11, x11, y11 = _corner_backward(
        v_ptr, gv_ptr, x0 + 1, y0 + 1, fx * fy, fy, fx, weight, go_rows, height, width, start, stride_pix, d_offs,
        d_ok, row_ok, CDT,
    )
    grad_weight = a00 + a01 + a10 + a11
    grad_x = weight * width * (x00 + x01 + x10 + x11)
    grad_y = weight * height * (y00 + y01 + y10 + y11)
    return grad_weight, grad_x, grad_y


@triton.jit
def rows_of_vector(vec, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr):
    """Per-query vector [BLOCK_Q] repeated for the BLOCK_P rows of each query -> [BLOCK_Q * BLOCK_P]."""
    return tl.reshape(tl.broadcast_to(vec[:, None], (BLOCK_Q, BLOCK_P)), (BLOCK_Q * BLOCK_P,))


@triton.jit
def rows_of_tile(tile, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per-query tile [BLOCK_Q, BLOCK_D] repeated for the BLOCK_P rows of each query -> [BLOCK_Q * BLOCK_P, BLOCK_D]."""
    return tl.reshape(tl.broadcast_to(tile[:, None, :], (BLOCK_Q, BLOCK_P, BLOCK_D)), (BLOCK_Q * BLOCK_P, BLOCK_D))


# ---------------------------------------------------------------------------------------------------------------
# the plain op
@triton.jit
def _level_table(shapes_ptr, starts_ptr, level):
    """(height, width, first pixel) of one level."""
    return tl.load(shapes_ptr + 2 * level), tl.load(shapes_ptr + 2 * level + 1), tl.load(starts_ptr + level)


@triton.jit
def _level_metadata(attn_ptr, loc_ptr, offs, ok, CDT: tl.constexpr):
    """Weights and normalised (x, y) [R] of one level's taps (zero where ``ok`` is false), read once (streamed)."""
    weight = tl.load(attn_ptr + offs, mask=ok, other=0.0, eviction_policy="evict_first").to(CDT)
    x = tl.load(loc_ptr + 2 * offs, mask=ok, other=0.0, eviction_policy="evict_first").to(CDT)
    y = tl.load(loc_ptr + 2 * offs + 1, mask=ok, other=0.0, eviction_policy="evict_first").to(CDT)
    return weight, x, y


@triton.jit
def msda_forward_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr,
    S, Lq, M, L, P, D, N_GROUPS, GROUP_LEVELS, GROUP_STRIDE,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, CDT: tl.constexpr,
    PREFETCH: tl.constexpr, Q_ITERS: tl.constexpr,
):
    pid_q = tl.program_id(0)
    head = tl.program_id(1)
    pid_z = tl.program_id(2)
    batch = (pid_z // N_GROUPS).to(tl.int64)
    group = pid_z % N_GROUPS
    # this program's levels (all of them unless the (image x level) axis is split over programs, see msda_forward)
    level_begin = group * GROUP_LEVELS
    level_end = tl.minimum(level_begin + GROUP_LEVELS, L)
    R: tl.constexpr = BLOCK_Q * BLOCK_P
    r = tl.arange(0, R)
    point = r % BLOCK_P
    d_offs = tl.arange(0, BLOCK_D)
    d_ok = d_offs < D
    stride_pix = M * D
    v_ptr = value_ptr + batch * S * stride_pix + head * D
    group_out_ptr = out_ptr + group.to(tl.int64) * GROUP_STRIDE
    for q_iter in range(Q_ITERS):  # consecutive query blocks of one program sample the same value slice
        q_first = (pid_q * Q_ITERS + q_iter) * BLOCK_Q
        query = q_first + r // BLOCK_P
        row_ok = (query < Lq) & (point < P)
        meta = ((batch * Lq + query) * M + head) * L * P + point  # [R] offset of (n, q, m, level 0, p)

        acc = tl.zeros([R, BLOCK_D], dtype=CDT)
        if PREFETCH:
            # the next level's weights and locations are in flight while this level's corners are gathered, so a
            # program never waits for its metadata and its gathers one after the other
            weight, x, y = _level_metadata(attn_ptr, loc_ptr, meta + level_begin * P, row_ok, CDT)
            for level in range(level_begin, level_end):
                height, width, start = _level_table(shapes_ptr, starts_ptr, level)
                next_weight, next_x, next_y = _level_metadata(
                    attn_ptr, loc_ptr, meta + (level + 1) * P, row_ok & (level + 1 < level_end), CDT
                )
                if tl.max((weight != 0.0).to(tl.int32), axis=0) > 0:  # exact skip of all-zero levels (NaN is not zero)
                    acc += sample_level(
                        v_ptr, x, y, weight, height, width, start, stride_pix, d_offs, d_ok, row_ok & (weight != 0.0),
                        CDT,
                    )
                weight = next_weight
                x = next_x
                y = next_y
        else:
            for level in range(level_begin, level_end):
                height, width, start = _level_table(shapes_ptr, starts_ptr, level)
                offs = meta + level * P
                weight = tl.load(attn_ptr + offs, mask=row_ok, other=0.0).to(CDT)
                if tl.max((weight != 0.0).to(tl.int32), axis=0) > 0:  # exact skip of all-zero levels (NaN is not zero)
                    x = tl.load(loc_ptr + 2 * offs, mask=row_ok, other=0.0).to(CDT)
                    y = tl.load(loc_ptr + 2 * offs + 1, mask=row_ok, other=0.0).to(CDT)
                    acc += sample_level(
                        v_ptr, x, y, weight, height, width, start, stride_pix, d_offs, d_ok, row_ok & (weight != 0.0),
                        CDT,
                    )
        out = tl.sum(tl.reshape(acc, (BLOCK_Q, BLOCK_P, BLOCK_D)), axis=1)
        q_out = q_first + tl.arange(0, BLOCK_Q)
        out_offs = ((batch * Lq + q_out) * M + head) * D
        out_mask = (q_out < Lq)[:, None] & d_ok[None, :]
        tl.store(group_out_ptr + out_offs[:, None] + d_offs[None, :], out.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def msda_backward_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, grad_out_ptr,
    grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
    S, Lq, M, L, P, D,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, CDT: tl.constexpr,
):
    pid_q = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    R: tl.constexpr = BLOCK_Q * BLOCK_P
    r = tl.arange(0, R)
    query = pid_q * BLOCK_Q + r // BLOCK_P
    point = r % BLOCK_P
    row_ok = (query < Lq) & (point < P)
    d_offs = tl.arange(0, BLOCK_D)
    d_ok = d_offs < D
    stride_pix = M * D
    pix_base = batch * S * stride_pix + head * D
    v_ptr = value_ptr + pix_base
    gv_ptr = grad_value_ptr + pix_base
    meta = ((batch * Lq + query) * M + head) * L * P + point

    q_block = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    go_offs = ((batch * Lq + q_block) * M + head) * D
    go_mask = (q_block < Lq)[:, None] & d_ok[None, :]
    grad_out = tl.load(grad_out_ptr + go_offs[:, None] + d_offs[None, :], mask=go_mask, other=0.0).to(CDT)
    go_rows = rows_of_tile(grad_out, BLOCK_Q, BLOCK_P, BLOCK_D)  # [R, BLOCK_D]

    for level in range(L):
        height, width, start = _level_table(shapes_ptr, starts_ptr, level)
        offs = meta + level * P
        weight = tl.load(attn_ptr + offs, mask=row_ok, other=0.0).to(CDT)
        x = tl.load(loc_ptr + 2 * offs, mask=row_ok, other=0.0).to(CDT)
        y = tl.load(loc_ptr + 2 * offs + 1, mask=row_ok, other=0.0).to(CDT)
        grad_weight, grad_x, grad_y = sample_level_backward(
            v_ptr, gv_ptr, x, y, weight, go_rows, height, width, start, stride_pix, d_offs, d_ok, row_ok, CDT
        )
        tl.store(grad_attn_ptr + offs, grad_weight, mask=row_ok)
        tl.store(grad_loc_ptr + 2 * offs, grad_x, mask=row_ok)
        tl.store(grad_loc_ptr + 2 * offs + 1, grad_y, mask=row_ok)


# fmt: on
# ---------------------------------------------------------------------------------------------------------------
# launchers
# The forward reads the next level's metadata while gathering this level's corners: 0.84 instead of 0.98 ms at the
# LLM-side shape in bf16 on an H100 (bench/kernel.py --tune-only; MMI_MSDA_PREFETCH=0 restores the plain loop).
FORWARD_PREFETCH = os.environ.get("MMI_MSDA_PREFETCH", "1") == "1"


def _whole_number_from_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit():
        raise ValueError(f"{name}={raw!r} must be a whole number >= 0; unset it for the default ({default})")
    return int(raw)


# The forward's locality options (msda_forward's group_levels and q_iters), not yet measured on a GPU, so off by
# default: MMI_MSDA_GROUP_LEVELS=3 gives each program one image's three levels, MMI_MSDA_Q_ITERS=2 two query blocks.
FORWARD_GROUP_LEVELS = _whole_number_from_env("MMI_MSDA_GROUP_LEVELS", 0)  # 0: all levels in one program
FORWARD_Q_ITERS = max(1, _whole_number_from_env("MMI_MSDA_Q_ITERS", 1))


def compute_tl_dtype(dtype: torch.dtype):
    """Triton compute dtype for a torch compute dtype (float32 or float64)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def launch_config(
    lq: int,
    n_points: int,
    d: int,
    block_q: int | None = None,
    num_warps: int | None = None,
    backward: bool = False,
    value_bytes: int = 2,
):
    """(BLOCK_Q, BLOCK_P, BLOCK_D, num_warps).

    Forward: corner tiles of about 8 KiB (64 sampling rows of 64 16-bit channels; 32 rows for wider heads or 32-bit
    values) on 2 warps for 16-bit values and 4 for 32-bit ones. Backward: 16 rows on 8 warps, which spreads one
    program's grad_value atomics over more threads. Chosen from the BLOCK_Q x num_warps sweeps on an H100 at the
    LLM-side MMFS shape (docs/BENCHMARKS.md, "Deformable sampling op"): bf16 8 x 2 (0.84 ms with the prefetch),
    fp32 4 x 4 (1.33 ms; 8 x 4 took 2.06-2.90 ms).
    """
    block_p = triton.next_power_of_2(n_points)
    block_d = triton.next_power_of_2(d)
    if block_q is None:
        rows = 16 if backward else min(64, max(8, 8192 // (block_d * max(value_bytes, 2))))
        block_q = max(1, min(max(rows // block_p, 1), triton.next_power_of_2(max(lq, 1))))
    if num_warps is None:
        if backward:
            num_warps = 8 if block_q * block_p * block_d >= 1024 else 2
        else:
            num_warps = 2 if value_bytes <= 2 else 4
    return block_q, block_p, block_d, num_warps


def _level_tables(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor):
    return spatial_shapes.to(torch.int32).contiguous(), level_start_index.to(torch.int32).contiguous()


def msda_forward(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    block_q: int | None = None,
    num_warps: int | None = None,
    prefetch: bool | None = None,
    group_levels: int | None = None,
    q_iters: int | None = None,
) -> torch.Tensor:
    """Launch the forward kernel on validated, contiguous inputs (locations/weights in the compute dtype).

    ``prefetch`` (default :data:`FORWARD_PREFETCH`) reads each level's metadata one level ahead.

    Locality options (for the GPU sweep, ``bench/kernel.py --tune-only --tune-split``; the defaults keep one program
    per query block over all levels): ``group_levels`` splits the (image x level) axis into groups of that many
    levels, one program per group (e.g. the 3 levels of one image, so that the programs running together sample
    one image's pyramid), whose partial sums, kept in the compute dtype, are added in a fixed order (deterministic);
    ``q_iters`` makes each program handle that many consecutive query blocks in turn. ``None`` takes the defaults
    :data:`FORWARD_GROUP_LEVELS` and :data:`FORWARD_Q_ITERS`; ``group_levels=0`` means all levels in one program.
    """
    n, s, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    out = value.new_empty(n, lq, m * d)
    if out.numel() == 0:
        return out.zero_()
    group_levels = FORWARD_GROUP_LEVELS if group_levels is None else group_levels
    q_iters = FORWARD_Q_ITERS if q_iters is None else q_iters
    if q_iters < 1 or group_levels < 0:
        raise ValueError(f"msda_forward: q_iters ({q_iters}) must be >= 1 and group_levels ({group_levels}) >= 0")
    group_levels = min(group_levels or n_levels, max(n_levels, 1))
    n_groups = triton.cdiv(n_levels, group_levels) if n_levels else 1
    target = out if n_groups == 1 else torch.empty(n_groups, n, lq, m * d, dtype=sampling_locations.dtype,
                                                   device=value.device)  # fmt: skip
    shapes, starts = _level_tables(spatial_shapes, level_start_index)
    bq, bp, bd, warps = launch_config(lq, n_points, d, block_q, num_warps, value_bytes=value.element_size())
    grid = (triton.cdiv(lq, bq * q_iters), m, n * n_groups)
    msda_forward_kernel[grid](
        value, shapes, starts, sampling_locations, attention_weights, target,
        s, lq, m, n_levels, n_points, d, n_groups, group_levels, n * lq * m * d,
        BLOCK_Q=bq, BLOCK_P=bp, BLOCK_D=bd, CDT=compute_tl_dtype(sampling_locations.dtype),
        PREFETCH=FORWARD_PREFETCH if prefetch is None else prefetch, Q_ITERS=q_iters, num_warps=warps,
    )  # fmt: skip
    if n_groups > 1:
        out.copy_(target.sum(0))  # the groups' partial sums, added in the compute dtype
    return out


def msda_backward(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    grad_output: torch.Tensor,
    block_q: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernel -> (grad_value in value's dtype, grad_locations, grad_weights)."""
    n, s, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    compute = sampling_locations.dtype
    grad_value = torch.zeros(value.shape, dtype=compute, device=value.device)
    grad_loc = torch.zeros_like(sampling_locations)
    grad_attn = torch.zeros_like(attention_weights)
    if grad_loc.numel() and value.numel():
        shapes, starts = _level_tables(spatial_shapes, level_start_index)
        bq, bp, bd, warps = launch_config(lq, n_points, d, block_q, num_warps, backward=True)
        grid = (triton.cdiv(lq, bq), m, n)
        msda_backward_kernel[grid](
            value, shapes, starts, sampling_locations, attention_weights, grad_output.contiguous(),
            grad_value, grad_loc, grad_attn,
            s, lq, m, n_levels, n_points, d,
            BLOCK_Q=bq, BLOCK_P=bp, BLOCK_D=bd, CDT=compute_tl_dtype(compute), num_warps=warps,
        )  # fmt: skip
    return grad_value.to(value.dtype), grad_loc, grad_attn
