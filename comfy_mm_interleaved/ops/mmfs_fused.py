"""Fused MMFS sampling (Triton): the custom op ``comfy_mm_interleaved::mmfs_sample`` and the module-side glue.

The unfused MMFS path materialises locations ``[N, Lq, M, n_img*L, P, 2]`` and softmax weights
``[N, Lq, M, n_img*L, P]`` (plus autograd copies) before calling :func:`ms_deform_attn`. The fused op instead takes
the per-token parts and per-recency tables of the offsets and logits (see ``MMFS.sampling_factors``) and the
recency index, and its kernel (``comfy_mm_interleaved.kernels.mmfs``) forms locations, the joint softmax with the
null slot, and the bilinear sums on the fly, skipping every image a query block cannot see. Forward outputs: the
sampled features ``[N, Lq, M*D]`` and the log-sum-exp ``[N, Lq, M]`` (null weight = ``exp(-lse)``).

The backward kernel returns per-image gradients of offsets and logits; they are reduced here onto the token parts
(sum over images) and the tables (one-hot matmul over the recency index: deterministic, no atomics). Used by
``MMFS.forward`` when :func:`comfy_mm_interleaved.ops.backend.mmfs_fused_enabled` (CUDA + Triton by default).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import triton_runs_on
from .msda_op import NAMESPACE


def _require_triton(device: torch.device) -> None:
    if not triton_runs_on(device):
        raise RuntimeError(
            f"the fused MMFS op needs Triton on CUDA (or TRITON_INTERPRET=1 on a CPU), got {device.type} tensors; "
            "set MMI_MMFS_FUSED=0 to use the unfused path"
        )


@torch.library.custom_op(f"{NAMESPACE}::mmfs_sample", mutates_args=())
def mmfs_sample_op(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    normaliser: torch.Tensor,
    ref: torch.Tensor,
    off_token: torch.Tensor,
    off_table: torch.Tensor,
    att_token: torch.Tensor,
    att_table: torch.Tensor,
    recency: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    _require_triton(value.device)
    from ..kernels.mmfs import mmfs_forward

    return mmfs_forward(
        value, spatial_shapes, level_start_index, normaliser, ref, off_token, off_table, att_token, att_table, recency
    )


@mmfs_sample_op.register_fake
def _(value, spatial_shapes, level_start_index, normaliser, ref, off_token, off_table, att_token, att_table, recency):
    n, _, m, d = value.shape
    lq = recency.shape[1]
    return value.new_empty(n, lq, m * d), normaliser.new_empty(n, lq, m)


@torch.library.custom_op(f"{NAMESPACE}::mmfs_sample_backward", mutates_args=())
def mmfs_sample_backward_op(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    normaliser: torch.Tensor,
    ref: torch.Tensor,
    off_token: torch.Tensor,
    off_table: torch.Tensor,
    att_token: torch.Tensor,
    att_table: torch.Tensor,
    recency: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> gradients of (value, ref, off_token, off_table, att_token, att_table)."""
    _require_triton(value.device)
    from ..kernels.mmfs import mmfs_backward

    grad_value, grad_off, grad_logit, grad_ref = mmfs_backward(
        value, spatial_shapes, level_start_index, normaliser, ref, off_token, off_table, att_token, att_table,
        recency, out, lse, grad_out, grad_lse,
    )  # fmt: skip
    # recency one-hot [N*Lq*n_img, R]: table rows collect the per-image gradients of the images of that recency
    one_hot = F.one_hot(recency.reshape(-1).long(), off_table.shape[0]).to(grad_off.dtype)
    grad_off_table = (one_hot.T @ grad_off.flatten(0, 2).flatten(1)).view(off_table.shape)
    grad_att_table = F.pad((one_hot.T @ grad_logit.flatten(0, 2).flatten(1)).view(att_table.shape[:-1] + (-1,)), (0, 1))
    grad_att_token = F.pad(grad_logit.sum(2), (0, 1))  # the unused (P+1)-th logit column gets 0
    grad_ref = grad_ref.sum(2)
    if ref.shape[0] != grad_ref.shape[0]:  # reference points broadcast over the batch
        grad_ref = grad_ref.sum(0, keepdim=True)
    return (
        grad_value.to(value.dtype),
        grad_ref.to(ref.dtype),
        grad_off.sum(2).to(off_token.dtype),
        grad_off_table.to(off_table.dtype),
        grad_att_token.to(att_token.dtype),
        grad_att_table.to(att_table.dtype),
    )


@mmfs_sample_backward_op.register_fake
def _(value, spatial_shapes, level_start_index, normaliser, ref, off_token, off_table, att_token, att_table, recency,
      out, lse, grad_out, grad_lse):  # fmt: skip
    return tuple(torch.empty_like(t) for t in (value, ref, off_token, off_table, att_token, att_table))


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs, *output)


def _backward(ctx, grad_out, grad_lse):
    *inputs, out, lse = ctx.saved_tensors
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.contiguous()
    grad_value, grad_ref, grad_off_token, grad_off_table, grad_att_token, grad_att_table = mmfs_sample_backward_op(
        *inputs, out, lse, grad_out, grad_lse
    )
    return grad_value, None, None, None, grad_ref, grad_off_token, grad_off_table, grad_att_token, grad_att_table, None


mmfs_sample_op.register_autograd(_backward, setup_context=_setup_context)


def mmfs_fused_sampling(
    module,
    query: torch.Tensor,
    reference_points: torch.Tensor,
    values: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    visible: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused equivalent of ``ms_deform_attn(values, ..., *module.sampling_plan(...)[:2])`` for an ``MMFS``.

    query [N, Lq, d_query]; reference_points [N or 1, Lq, 1, 2]; values [N, n_img*S, M, D]; visible [N, Lq, n_img].
    Returns (sampled [N, Lq, M*D] in values' dtype, null weight [N, Lq, M] in the compute dtype).
    """
    n, lq, _ = query.shape
    n_img = visible.shape[-1]
    heads, levels, points = module.n_heads, module.n_levels, module.n_points
    if spatial_shapes.shape[0] != n_img * levels:
        raise ValueError(
            f"MMFS got spatial_shapes for {spatial_shapes.shape[0]} maps but the mask has {n_img} images x "
            f"{levels} levels"
        )
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    recency, off_token, off_table, att_token, att_table = module.sampling_factors(query, visible)
    normaliser = module.level_normaliser(spatial_shapes, compute).reshape(n_img * levels, 2).contiguous()
    sampled, lse = mmfs_sample_op(
        values.contiguous(),
        spatial_shapes,
        level_start_index,
        normaliser,
        reference_points[:, :, 0].to(compute).contiguous(),
        off_token.reshape(n, lq, heads, points, 2).contiguous(),
        off_table.reshape(-1, heads, points, 2).contiguous(),
        att_token.reshape(n, lq, heads, levels, points + 1).contiguous(),
        att_table.reshape(-1, heads, levels, points + 1).contiguous(),
        recency.to(torch.int32).contiguous(),
    )
    return sampled, torch.exp(-lse)
