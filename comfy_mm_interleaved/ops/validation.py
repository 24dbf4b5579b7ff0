"""Input checks of the deformable-sampling op: clear errors before anything is launched.

Metadata checks (ranks, sizes, dtypes, devices, contiguity) always run; they cost nothing and trace under
``torch.compile``. The data-dependent check that the level sizes add up to ``S`` and that ``level_start_index`` is
their running sum reads the two small tables to the host: it runs in eager mode only, once per pair of table tensors
(remembered by identity and version counter, so the same tables passed to every MMFS layer and every diffusion step
are read once), and ``MMI_MSDA_CHECK_LEVELS=0`` switches it off (on a GPU each read is a device synchronisation).
"""

from __future__ import annotations

import os
import weakref

import torch

VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def _require(condition: bool, message: str, error: type[Exception] = ValueError) -> None:
    if not condition:
        raise error(message)


def _check_rank(name: str, tensor: object, rank: int, layout: str) -> None:
    _require(torch.is_tensor(tensor), f"{name} must be a torch.Tensor {layout}, got {type(tensor).__name__}", TypeError)
    _require(tensor.dim() == rank, f"{name} must have {rank} dims {layout}, got shape {tuple(tensor.shape)}")


def check_msda_inputs(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> None:
    """Raise ``TypeError``/``ValueError`` naming the offending argument and the expected layout."""
    _check_rank("value", value, 4, "[N, S, M, D]")
    _check_rank("spatial_shapes", spatial_shapes, 2, "[L, 2] of (H, W)")
    _check_rank("level_start_index", level_start_index, 1, "[L]")
    _check_rank("sampling_locations", sampling_locations, 6, "[N, Lq, M, L, P, 2]")
    _check_rank("attention_weights", attention_weights, 5, "[N, Lq, M, L, P]")

    n, _, m, d = value.shape
    n_levels = spatial_shapes.shape[0]
    _require(spatial_shapes.shape[1] == 2, f"spatial_shapes must be [L, 2] (H, W), got {tuple(spatial_shapes.shape)}")
    _require(n_levels >= 1, "spatial_shapes has no level: the op samples at least one feature map")
    _require(d >= 1, f"value has no channels per head (D = 0, shape {tuple(value.shape)})")
    _require(
        sampling_locations.dim() < 5 or sampling_locations.shape[4] >= 1,
        f"sampling_locations has no sampling point per level (P = 0, shape {tuple(sampling_locations.shape)})",
    )
    _require(
        level_start_index.shape[0] == n_levels,
        f"level_start_index has {level_start_index.shape[0]} entries but spatial_shapes has {n_levels} levels",
    )
    loc_shape = tuple(sampling_locations.shape)
    _require(loc_shape[-1] == 2, f"sampling_locations must end in (x, y), got shape {loc_shape}")
    _require(
        loc_shape[0] == n and loc_shape[2] == m and loc_shape[3] == n_levels,
        f"sampling_locations {loc_shape} must be [N={n}, Lq, M={m}, L={n_levels}, P, 2] "
        f"to match value {tuple(value.shape)} and spatial_shapes {tuple(spatial_shapes.shape)}",
    )
    _require(
        tuple(attention_weights.shape) == loc_shape[:-1],
        f"attention_weights {tuple(attention_weights.shape)} must be sampling_locations' shape without the last "
        f"dim, {loc_shape[:-1]}",
    )

    _require(
        value.dtype in VALUE_DTYPES,
        f"value must be float16, bfloat16, float32 or float64, got {value.dtype}",
        TypeError,
    )
    for name, tensor in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        message = f"{name} must be floating point (float32 recommended), got {tensor.dtype}"
        _require(tensor.is_floating_point(), message, TypeError)
    for name, tensor in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        _require(tensor.dtype in INDEX_DTYPES, f"{name} must be int64 (or int32), got {tensor.dtype}", TypeError)

    tensors = {
        "value": value,
        "spatial_shapes": spatial_shapes,
        "level_start_index": level_start_index,
        "sampling_locations": sampling_locations,
        "attention_weights": attention_weights,
    }
    devices = {name: t.device for name, t in tensors.items()}
    _require(
        len(set(devices.values())) == 1,
        "all inputs must be on one device, got " + ", ".join(f"{k}={v}" for k, v in devices.items()),
    )
    for name in ("value", "sampling_locations", "attention_weights"):
        _require(
            tensors[name].is_contiguous(),
            f"{name} must be contiguous (call .contiguous() on it first); got strides {tensors[name].stride()}",
        )
    check_levels(spatial_shapes, level_start_index, value.shape[1])


# (id(spatial_shapes), id(level_start_index), n_pixels) -> (weak refs, version counters) of tables already checked
_CHECKED: dict[tuple[int, int, int], tuple[weakref.ref, weakref.ref, int, int]] = {}
_MAX_CHECKED = 256


def _version(table: torch.Tensor) -> int:
    """In-place edits bump a tensor's version counter; inference-mode tensors have none (identity only)."""
    return -1 if table.is_inference() else table._version


def _already_checked(key: tuple[int, int, int], spatial_shapes: torch.Tensor, level_start_index: torch.Tensor) -> bool:
    entry = _CHECKED.get(key)
    return (
        entry is not None
        and entry[0]() is spatial_shapes
        and entry[1]() is level_start_index
        and entry[2:] == (_version(spatial_shapes), _version(level_start_index))
    )


def check_levels(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, n_pixels: int) -> None:
    """Level sizes must be >= 1, add up to ``n_pixels`` and be laid out by ``level_start_index``."""
    if torch.compiler.is_compiling() or os.environ.get("MMI_MSDA_CHECK_LEVELS", "1") == "0":
        return
    key = (id(spatial_shapes), id(level_start_index), n_pixels)
    if _already_checked(key, spatial_shapes, level_start_index):
        return
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    starts = [int(s) for s in level_start_index.tolist()]
    _require(all(h >= 1 and w >= 1 for h, w in shapes), f"every level needs H, W >= 1, got spatial_shapes {shapes}")
    sizes = [h * w for h, w in shapes]
    expected = [sum(sizes[:i]) for i in range(len(sizes))]
    _require(
        sum(sizes) == n_pixels,
        f"spatial_shapes {shapes} add up to {sum(sizes)} pixels but value has S={n_pixels}; value must hold the "
        "row-major flattened levels back to back",
    )
    _require(
        starts == expected,
        f"level_start_index {starts} must be the running sum of H*W, {expected}",
    )
    if len(_CHECKED) >= _MAX_CHECKED:
        _CHECKED.clear()
    _CHECKED[key] = (
        weakref.ref(spatial_shapes),
        weakref.ref(level_start_index),
        _version(spatial_shapes),
        _version(level_start_index),
    )
