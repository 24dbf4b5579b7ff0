"""The custom op ``comfy_mm_interleaved::ms_deform_attn`` and its backward op.

One implementation function per op serves every device: it runs the Triton kernels when the backend for the
device is ``triton`` (CUDA by default; a CPU under ``TRITON_INTERPRET=1`` when forced) and the gather fallback
otherwise. ``register_fake`` gives both ops shape functions, so ``torch.compile`` treats them as opaque nodes
without graph breaks, and ``register_autograd`` connects the backward op. The backward is first order only.

Expected inputs (the public :func:`comfy_mm_interleaved.ops.ms_deform_attn` validates and casts them): contiguous
tensors on one device, sampling locations and attention weights in the compute dtype (float32, or float64 for
gradient checks), value in float16 / bfloat16 / float32 / float64. The output has value's dtype; accumulation is
in the compute dtype, and so is the value-gradient buffer, cast to value's dtype at the end.
"""

from __future__ import annotations

import torch

from .backend import backend_for
from .gather import gather_backward, gather_forward

NAMESPACE = "comfy_mm_interleaved"


def _triton(device: torch.device) -> bool:
    return backend_for(device) == "triton"


@torch.library.custom_op(f"{NAMESPACE}::ms_deform_attn", mutates_args=())
def ms_deform_attn_op(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    if _triton(value.device):
        from ..kernels.msda import msda_forward

        return msda_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    compute = sampling_locations.dtype
    out = gather_forward(
        value.to(compute), spatial_shapes.long(), level_start_index.long(), sampling_locations, attention_weights
    )
    return out.to(value.dtype)


@ms_deform_attn_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    n, _, m, d = value.shape
    return value.new_empty(n, sampling_locations.shape[1], m * d)


@torch.library.custom_op(f"{NAMESPACE}::ms_deform_attn_backward", mutates_args=())
def ms_deform_attn_backward_op(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    grad_output: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _triton(value.device):
        from ..kernels.msda import msda_backward

        return msda_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output
        )
    compute = sampling_locations.dtype
    grad_value, grad_loc, grad_attn = gather_backward(
        value.to(compute),
        spatial_shapes.long(),
        level_start_index.long(),
        sampling_locations,
        attention_weights,
        grad_output.to(compute),
    )
    return grad_value.to(value.dtype), grad_loc, grad_attn


@ms_deform_attn_backward_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output):
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = ms_deform_attn_backward_op(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output.contiguous()
    )
    return grad_value, None, None, grad_loc, grad_attn


ms_deform_attn_op.register_autograd(_backward, setup_context=_setup_context)
