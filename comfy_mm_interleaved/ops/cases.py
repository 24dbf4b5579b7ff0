"""Random inputs of the deformable-sampling op, shared by the tests, the benchmark and the GPU check."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def level_tables(
    shapes: Sequence[tuple[int, int]], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W) per level -> spatial_shapes [L, 2] and level_start_index [L] (int64)."""
    spatial_shapes = torch.tensor([list(s) for s in shapes], dtype=torch.int64, device=device).view(-1, 2)
    sizes = spatial_shapes.prod(1)
    return spatial_shapes, sizes.cumsum(0) - sizes


@dataclass
class MSDACase:
    """One set of op inputs (``args()`` in the op's argument order) and a gradient for its output."""

    value: torch.Tensor
    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor
    sampling_locations: torch.Tensor
    attention_weights: torch.Tensor
    grad_output: torch.Tensor

    def args(self) -> tuple[torch.Tensor, ...]:
        return (
            self.value,
            self.spatial_shapes,
            self.level_start_index,
            self.sampling_locations,
            self.attention_weights,
        )

    def to(self, value_dtype: torch.dtype, compute_dtype: torch.dtype = torch.float32) -> MSDACase:
        """Copy with value (and the output gradient) in ``value_dtype``, locations and weights in ``compute_dtype``."""
        return MSDACase(
            self.value.to(value_dtype),
            self.spatial_shapes,
            self.level_start_index,
            self.sampling_locations.to(compute_dtype),
            self.attention_weights.to(compute_dtype),
            self.grad_output.to(value_dtype),
        )


def random_case(
    batch: int,
    queries: int,
    heads: int,
    channels: int,
    shapes: Sequence[tuple[int, int]],
    points: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    loc_range: tuple[float, float] = (-0.1, 1.1),
    seed: int = 0,
) -> MSDACase:
    """Normal values, uniform locations in ``loc_range`` (outside [0, 1] exercises the zero padding) and softmax
    weights over (levels x points), drawn on the CPU from ``seed`` and moved to ``device``."""
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start_index = level_tables(shapes)
    n_levels, n_pixels = len(shapes), int(spatial_shapes.prod(1).sum())
    low, high = loc_range
    value = torch.randn(batch, n_pixels, heads, channels, generator=gen, dtype=torch.float64)
    loc = low + (high - low) * torch.rand(
        batch, queries, heads, n_levels, points, 2, generator=gen, dtype=torch.float64
    )
    logits = torch.randn(batch, queries, heads, n_levels * points, generator=gen, dtype=torch.float64)
    weights = logits.softmax(-1).view(batch, queries, heads, n_levels, points)
    grad_output = torch.randn(batch, queries, heads * channels, generator=gen, dtype=torch.float64)
    tensors = (value, spatial_shapes, level_start_index, loc, weights, grad_output)
    case = MSDACase(*(t.to(device) for t in tensors))
    return case.to(dtype, torch.float64 if dtype == torch.float64 else torch.float32)


def causal_image_visibility(
    batch: int, queries: int, n_images: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """[N, Lq, n_img] 0/1: image i becomes visible at query ``(i + 1) * Lq // (n_img + 1)`` (an interleaved document,
    so about half of the (query, image) pairs are invisible, as in the LLM-side MMFS)."""
    first = (torch.arange(n_images, device=device) + 1) * queries // (n_images + 1)
    visible = torch.arange(queries, device=device)[:, None] >= first[None, :]
    return visible.to(torch.float32).expand(batch, queries, n_images).contiguous()


def mask_invisible_images(case: MSDACase, visible: torch.Tensor, levels_per_image: int) -> MSDACase:
    """Zero the attention weights of images a query cannot see (``visible`` [N, Lq, n_img]) and renormalise."""
    per_level = visible.repeat_interleave(levels_per_image, dim=-1)  # [N, Lq, n_img * L]
    weights = case.attention_weights * per_level[:, :, None, :, None].to(case.attention_weights.dtype)
    weights = weights / weights.sum((-1, -2), keepdim=True).clamp_min(1e-12)
    return MSDACase(
        case.value, case.spatial_shapes, case.level_start_index, case.sampling_locations, weights, case.grad_output
    )


def non_finite_points(case: MSDACase) -> tuple[MSDACase, MSDACase]:
    """``case`` with three sampling points at (NaN, y), (+inf, y) and (x, -inf), and the same case with those points
    far off the map instead. The op treats a non-finite point as off the map, as the official kernel does (its
    bounds test is false for NaN): the oracle of the first case is ``reference_with_grads`` of the second."""
    poisoned, far = case.sampling_locations.clone(), case.sampling_locations.clone()
    flat_poisoned, flat_far = poisoned.view(-1, 2), far.view(-1, 2)
    points = flat_poisoned.shape[0]
    for k, (index, axis, bad) in enumerate(((0, 0, float("nan")), (points // 2, 0, float("inf")),
                                            (points - 1, 1, float("-inf")))):  # fmt: skip
        flat_poisoned[index, axis] = bad
        flat_far[index] = -10.0 - k

    def with_locations(loc: torch.Tensor) -> MSDACase:
        return MSDACase(
            case.value, case.spatial_shapes, case.level_start_index, loc, case.attention_weights, case.grad_output
        )

    return with_locations(poisoned), with_locations(far)


def reference_with_grads(case: MSDACase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``grid_sample`` oracle in float64 on the CPU: (output, grad_value, grad_locations, grad_weights)."""
    from .reference import ms_deform_attn_reference

    value, loc, weights = (
        t.detach().cpu().double().requires_grad_()
        for t in (case.value, case.sampling_locations, case.attention_weights)
    )
    out = ms_deform_attn_reference(value, case.spatial_shapes.cpu(), loc, weights)
    out.backward(case.grad_output.detach().cpu().double())
    return out.detach(), value.grad, loc.grad, weights.grad


def relative_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 on the CPU."""
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))
