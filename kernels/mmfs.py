"""Fused MMFS sampling: recency lookup, locations, joint softmax (with the null slot) and deformable sampling.

MMFS (``comfy_mm_interleaved/models/mmfs.py``) builds, for every query t, head h, image i, level l, point p:

    offset[t, i, h, p]   = off_token[t, h, p] + off_table[r(t, i), h, p]            (x, y)
    loc[t, h, i, l, p]   = ref[t] + offset[t, i, h, p] / normaliser[i, l]           (normaliser = (W, H) / ratio_l)
    logit[t, h, i, l, p] = att_token[t, h, l, p] + att_table[r(t, i), h, l, p]     (visible images only)
    w = softmax over (i, l, p) and a null slot of logit 0;   lse = log(1 + sum exp(logit))
    out[t, h] = sum_{i, l, p} w * bilinear(value[i, l, h], loc)

with r(t, i) the recency index (0 = image invisible). The kernels read the per-token parts, the small tables and
the recency index, and never build the ``[N, Lq, M, n_img * L, P]`` locations or weights. Invisible images have
weight exactly 0 in the unfused module (a -10000 logit underflows ``exp`` once the null slot's 0 is in the
maximum), so they are skipped: a query block touches an image only if one of its queries sees it.

Shapes: value [N, S, M, D]; shapes/starts [n_img * L, 2] / [n_img * L] int32; normaliser [n_img * L, 2] (W', H');
ref [N or 1, Lq, 2]; off_token [N, Lq, M, P, 2]; off_table [R, M, P, 2]; att_token [N, Lq, M, L, P + 1];
att_table [R, M, L, P + 1] (the last logit column is unused, as in the official module); recency [N, Lq, n_img]
int32. Outputs: out [N, Lq, M * D] and lse [N, Lq, M] (null weight = exp(-lse)).

The backward writes grad_value (atomics), the per-image gradients of the offsets [N, Lq, n_img, M, P, 2] and of
the logits [N, Lq, n_img, M, L, P] (only the visible images' entries are written; the buffers come zeroed), and the
reference-point gradient per head [N, Lq, M, 2]; the Python side reduces them onto the token parts and tables.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .msda import (
    compute_tl_dtype,
    launch_config,
    rows_of_tile,
    rows_of_vector,
    sample_level,
    sample_level_backward,
)


# Kernel signatures and calls keep their arguments grouped by role, one group per line.
# fmt: off
@triton.jit
def _image_offsets(off_tok_ptr, off_tab_ptr, tok_row, rec_rows, head, M, P, point, ok, CDT: tl.constexpr):
    """Per-row (x, y) offsets of one image: token part + recency-table row."""
    tok = (tok_row * P + point) * 2
    tab = ((rec_rows * M + head) * P + point) * 2
    ox = tl.load(off_tok_ptr + tok, mask=ok, other=0.0).to(CDT) + tl.load(off_tab_ptr + tab, mask=ok, other=0.0).to(CDT)
    oy = (tl.load(off_tok_ptr + tok + 1, mask=ok, other=0.0).to(CDT)
          + tl.load(off_tab_ptr + tab + 1, mask=ok, other=0.0).to(CDT))
    return ox, oy


@triton.jit
def _logits(att_tok_ptr, att_tab_ptr, tok_row, rec_rows, head, M, P, level, point, ok, L_IMG: tl.constexpr,
            CDT: tl.constexpr):
    """Per-row logits of one (image, level); -inf where ``ok`` is false."""
    tok = (tok_row * L_IMG + level) * (P + 1) + point
    tab = ((rec_rows * M + head) * L_IMG + level) * (P + 1) + point
    z = tl.load(att_tok_ptr + tok, mask=ok, other=0.0).to(CDT) + tl.load(att_tab_ptr + tab, mask=ok, other=0.0).to(CDT)
    return tl.where(ok, z, float("-inf"))


@triton.jit
def _image_rows(rec_ptr, batch, q_block, q_ok, Lq, n_img, image, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr):
    """Recency index of ``image`` per query [BLOCK_Q] and per row [R], and whether any query of the block sees it."""
    rec = tl.load(rec_ptr + (batch * Lq + q_block) * n_img + image, mask=q_ok, other=0)
    return rec, rows_of_vector(rec, BLOCK_Q, BLOCK_P), tl.max(rec, axis=0) > 0


@triton.jit
def mmfs_forward_kernel(
    value_ptr, shapes_ptr, starts_ptr, norm_ptr, ref_ptr, off_tok_ptr, off_tab_ptr, att_tok_ptr, att_tab_ptr,
    rec_ptr, out_ptr, lse_ptr,
    S, Lq, M, P, D, n_img, ref_batch_stride,
    L_IMG: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, CDT: tl.constexpr,
):
    pid_q = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    R: tl.constexpr = BLOCK_Q * BLOCK_P
    r = tl.arange(0, R)
    query = pid_q * BLOCK_Q + r // BLOCK_P
    point = r % BLOCK_P
    row_ok = (query < Lq) & (point < P)
    q_block = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = q_block < Lq
    d_offs = tl.arange(0, BLOCK_D)
    d_ok = d_offs < D
    stride_pix = M * D
    v_ptr = value_ptr + batch * S * stride_pix + head * D
    tok_row = (batch * Lq + query) * M + head  # [R] row of the per-token tensors

    # pass 1: joint softmax statistics over visible (image, level, point) plus the null slot (logit 0)
    run_max = tl.zeros([BLOCK_Q], dtype=CDT)
    run_sum = tl.full([BLOCK_Q], 1.0, dtype=CDT)
    for image in range(n_img):
        rec, rec_rows, any_visible = _image_rows(rec_ptr, batch, q_block, q_ok, Lq, n_img, image, BLOCK_Q, BLOCK_P)
        if any_visible:
            ok = row_ok & (rec_rows > 0)
            for level in range(L_IMG):
                z = _logits(att_tok_ptr, att_tab_ptr, tok_row, rec_rows, head, M, P, level, point, ok, L_IMG, CDT)
                z = tl.reshape(z, (BLOCK_Q, BLOCK_P))
                new_max = tl.maximum(run_max, tl.max(z, axis=1))
                run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
                run_max = new_max
    lse = run_max + tl.log(run_sum)
    tl.store(lse_ptr + (batch * Lq + q_block) * M + head, lse, mask=q_ok)

    # pass 2: weighted bilinear samples
    lse_rows = rows_of_vector(lse, BLOCK_Q, BLOCK_P)
    ref_offs = (batch * ref_batch_stride + query) * 2
    ref_x = tl.load(ref_ptr + ref_offs, mask=row_ok, other=0.0).to(CDT)
    ref_y = tl.load(ref_ptr + ref_offs + 1, mask=row_ok, other=0.0).to(CDT)
    acc = tl.zeros([R, BLOCK_D], dtype=CDT)
    for image in range(n_img):
        rec, rec_rows, any_visible = _image_rows(rec_ptr, batch, q_block, q_ok, Lq, n_img, image, BLOCK_Q, BLOCK_P)
        if any_visible:
            ok = row_ok & (rec_rows > 0)
            ox, oy = _image_offsets(off_tok_ptr, off_tab_ptr, tok_row, rec_rows, head, M, P, point, ok, CDT)
            for level in range(L_IMG):
                lvl = image * L_IMG + level
                height = tl.load(shapes_ptr + 2 * lvl)
                width = tl.load(shapes_ptr + 2 * lvl + 1)
                start = tl.load(starts_ptr + lvl)
                x = ref_x + ox / tl.load(norm_ptr + 2 * lvl).to(CDT)
                y = ref_y + oy / tl.load(norm_ptr + 2 * lvl + 1).to(CDT)
                z = _logits(att_tok_ptr, att_tab_ptr, tok_row, rec_rows, head, M, P, level, point, ok, L_IMG, CDT)
                weight = tl.where(ok, tl.exp(z - lse_rows), 0.0)
                acc += sample_level(
                    v_ptr, x, y, weight, height, width, start, stride_pix, d_offs, d_ok, ok & (weight != 0.0), CDT
                )
    out = tl.sum(tl.reshape(acc, (BLOCK_Q, BLOCK_P, BLOCK_D)), axis=1)
    out_offs = ((batch * Lq + q_block) * M + head) * D
    tl.store(
        out_ptr + out_offs[:, None] + d_offs[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=q_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def mmfs_backward_kernel(
    value_ptr, shapes_ptr, starts_ptr, norm_ptr, ref_ptr, off_tok_ptr, off_tab_ptr, att_tok_ptr, att_tab_ptr,
    rec_ptr, out_ptr, lse_ptr, grad_out_ptr, grad_lse_ptr,
    grad_value_ptr, grad_off_ptr, grad_logit_ptr, grad_ref_ptr,
    S, Lq, M, P, D, n_img, ref_batch_stride,
    L_IMG: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, CDT: tl.constexpr,
):
    pid_q = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    R: tl.constexpr = BLOCK_Q * BLOCK_P
    r = tl.arange(0, R)
    query = pid_q * BLOCK_Q + r // BLOCK_P
    point = r % BLOCK_P
    row_ok = (query < Lq) & (point < P)
    q_block = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = q_block < Lq
    d_offs = tl.arange(0, BLOCK_D)
    d_ok = d_offs < D
    stride_pix = M * D
    pix_base = batch * S * stride_pix + head * D
    v_ptr = value_ptr + pix_base
    gv_ptr = grad_value_ptr + pix_base
    tok_row = (batch * Lq + query) * M + head

    # d logit_i = w_i * (go . sample_i - c),  c = go . out - d lse   (softmax with the null slot folded into lse)
    stat_offs = (batch * Lq + q_block) * M + head
    tile_offs = stat_offs[:, None] * D + d_offs[None, :]
    tile_mask = q_ok[:, None] & d_ok[None, :]
    grad_out = tl.load(grad_out_ptr + tile_offs, mask=tile_mask, other=0.0).to(CDT)
    out = tl.load(out_ptr + tile_offs, mask=tile_mask, other=0.0).to(CDT)
    lse = tl.load(lse_ptr + stat_offs, mask=q_ok, other=0.0).to(CDT)
    grad_lse = tl.load(grad_lse_ptr + stat_offs, mask=q_ok, other=0.0).to(CDT)
    centre = tl.sum(grad_out * out, axis=1) - grad_lse
    go_rows = rows_of_tile(grad_out, BLOCK_Q, BLOCK_P, BLOCK_D)
    centre_rows = rows_of_vector(centre, BLOCK_Q, BLOCK_P)
    lse_rows = rows_of_vector(lse, BLOCK_Q, BLOCK_P)

    ref_offs = (batch * ref_batch_stride + query) * 2
    ref_x = tl.load(ref_ptr + ref_offs, mask=row_ok, other=0.0).to(CDT)
    ref_y = tl.load(ref_ptr + ref_offs + 1, mask=row_ok, other=0.0).to(CDT)
    grad_ref_x = tl.zeros([R], dtype=CDT)
    grad_ref_y = tl.zeros([R], dtype=CDT)
    for image in range(n_img):
        rec, rec_rows, any_visible = _image_rows(rec_ptr, batch, q_block, q_ok, Lq, n_img, image, BLOCK_Q, BLOCK_P)
        if any_visible:
            ok = row_ok & (rec_rows > 0)
            ox, oy = _image_offsets(off_tok_ptr, off_tab_ptr, tok_row, rec_rows, head, M, P, point, ok, CDT)
            grad_ox = tl.zeros([R], dtype=CDT)
            grad_oy = tl.zeros([R], dtype=CDT)
            # per-image row of the gradient buffers: [N, Lq, n_img, M, ...]
            img_row = ((batch * Lq + query) * n_img + image) * M + head
            for level in range(L_IMG):
                lvl = image * L_IMG + level
                height = tl.load(shapes_ptr + 2 * lvl)
                width = tl.load(shapes_ptr + 2 * lvl + 1)
                start = tl.load(starts_ptr + lvl)
                norm_x = tl.load(norm_ptr + 2 * lvl).to(CDT)
                norm_y = tl.load(norm_ptr + 2 * lvl + 1).to(CDT)
                x = ref_x + ox / norm_x
                y = ref_y + oy / norm_y
                z = _logits(att_tok_ptr, att_tab_ptr, tok_row, rec_rows, head, M, P, level, point, ok, L_IMG, CDT)
                weight = tl.where(ok, tl.exp(z - lse_rows), 0.0)
                live = ok & (weight != 0.0)
                grad_weight, grad_x, grad_y = sample_level_backward(
                    v_ptr, gv_ptr, x, y, weight, go_rows, height, width, start, stride_pix, d_offs, d_ok, live, CDT
                )
                grad_logit = tl.where(live, weight * (grad_weight - centre_rows), 0.0)
                tl.store(grad_logit_ptr + (img_row * L_IMG + level) * P + point, grad_logit, mask=ok)
                grad_ox += grad_x / norm_x
                grad_oy += grad_y / norm_y
                grad_ref_x += grad_x
                grad_ref_y += grad_y
            off_offs = (img_row * P + point) * 2
            tl.store(grad_off_ptr + off_offs, grad_ox, mask=ok)
            tl.store(grad_off_ptr + off_offs + 1, grad_oy, mask=ok)
    grad_ref_x = tl.sum(tl.reshape(grad_ref_x, (BLOCK_Q, BLOCK_P)), axis=1)
    grad_ref_y = tl.sum(tl.reshape(grad_ref_y, (BLOCK_Q, BLOCK_P)), axis=1)
    tl.store(grad_ref_ptr + stat_offs * 2, grad_ref_x, mask=q_ok)
    tl.store(grad_ref_ptr + stat_offs * 2 + 1, grad_ref_y, mask=q_ok)


# fmt: on
# ---------------------------------------------------------------------------------------------------------------
# launchers
def _common(value, spatial_shapes, level_start_index, ref, att_token, recency, block_q, num_warps):
    n, s, m, d = value.shape
    lq, n_img = recency.shape[1], recency.shape[2]
    levels, n_points = att_token.shape[3], att_token.shape[4] - 1
    bq, bp, bd, warps = launch_config(lq, n_points, d, block_q, num_warps)
    if num_warps is None:  # the fused kernels were not part of the sweep: keep 4 warps for 64-row x 64-wide tiles
        warps = 4 if bq * bp * bd >= 4096 else 2
    meta = dict(
        S=s, Lq=lq, M=m, P=n_points, D=d, n_img=n_img, ref_batch_stride=0 if ref.shape[0] == 1 else lq,
        L_IMG=levels, BLOCK_Q=bq, BLOCK_P=bp, BLOCK_D=bd, num_warps=warps,
    )  # fmt: skip
    tables = (spatial_shapes.to(torch.int32).contiguous(), level_start_index.to(torch.int32).contiguous())
    return (triton.cdiv(lq, bq), m, n), tables, meta


def mmfs_forward(
    value, spatial_shapes, level_start_index, normaliser, ref, off_token, off_table, att_token, att_table, recency,
    block_q: int | None = None, num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """-> (out [N, Lq, M*D] in value's dtype, lse [N, Lq, M] in the compute dtype = normaliser's dtype)."""
    n, _, m, d = value.shape
    lq = recency.shape[1]
    out = value.new_empty(n, lq, m * d)
    lse = normaliser.new_zeros(n, lq, m)
    if out.numel() == 0:
        return out.zero_(), lse
    grid, (shapes, starts), meta = _common(
        value, spatial_shapes, level_start_index, ref, att_token, recency, block_q, num_warps
    )
    mmfs_forward_kernel[grid](
        value, shapes, starts, normaliser, ref, off_token, off_table, att_token, att_table, recency, out, lse,
        CDT=compute_tl_dtype(normaliser.dtype), **meta,
    )  # fmt: skip
    return out, lse


def mmfs_backward(
    value, spatial_shapes, level_start_index, normaliser, ref, off_token, off_table, att_token, att_table, recency,
    out, lse, grad_out, grad_lse, block_q: int | None = None, num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """-> grad_value [N, S, M, D] (compute dtype), grad_offsets [N, Lq, n_img, M, P, 2],
    grad_logits [N, Lq, n_img, M, L, P], grad_ref [N, Lq, M, 2] (compute dtype)."""
    n, _, m, _ = value.shape
    lq, n_img = recency.shape[1], recency.shape[2]
    levels, n_points = att_token.shape[3], att_token.shape[4] - 1
    compute = normaliser.dtype
    grad_value = torch.zeros(value.shape, dtype=compute, device=value.device)
    grad_off = torch.zeros(n, lq, n_img, m, n_points, 2, dtype=compute, device=value.device)
    grad_logit = torch.zeros(n, lq, n_img, m, levels, n_points, dtype=compute, device=value.device)
    grad_ref = torch.zeros(n, lq, m, 2, dtype=compute, device=value.device)
    if grad_ref.numel() and value.numel():
        grid, (shapes, starts), meta = _common(
            value, spatial_shapes, level_start_index, ref, att_token, recency, block_q, num_warps
        )
        mmfs_backward_kernel[grid](
            value, shapes, starts, normaliser, ref, off_token, off_table, att_token, att_table, recency,
            out, lse, grad_out, grad_lse, grad_value, grad_off, grad_logit, grad_ref,
            CDT=compute_tl_dtype(compute), **meta,
        )  # fmt: skip
    return grad_value, grad_off, grad_logit, grad_ref
