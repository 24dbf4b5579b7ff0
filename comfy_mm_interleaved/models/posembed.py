"""Fixed sine-cosine position embeddings (MAE convention), used by the tokenizer, MMFSNet and the context."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sincos_1d(dim: int, positions: torch.Tensor, compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``positions`` [...] -> [..., dim]: first half sin(pos * w_k), second half cos, w_k = 10000^(-k / (dim/2)).

    The fixed tables stored in the checkpoint were made in float64 (then rounded); the context positions of the
    image decoder are computed at run time in float32 by the official code (``compute_dtype=torch.float32``),
    which differs from float64 by up to ~2e-4 at positions near 2000.
    """
    if dim % 2 != 0:
        raise ValueError(f"sin-cos embedding dimension must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=compute_dtype, device=positions.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # [dim/2]
    angles = positions.to(compute_dtype)[..., None] * omega  # [..., dim/2]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1).to(torch.float32)


def sincos_2d(dim: int, grid_size: int, cls_token: bool = False) -> torch.Tensor:
    """[grid_size**2 (+1), dim] table for a square grid, row-major over (row, col).

    The first half of the channels encodes the row coordinate, the second half the column
    (checked against the tables stored in the official checkpoint).
    With ``cls_token`` a zero row is prepended.
    """
    if dim % 4 != 0:
        raise ValueError(f"2-D sin-cos embedding dimension must be divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # [g, g] each
    table = torch.cat([sincos_1d(dim // 2, rows.reshape(-1)), sincos_1d(dim // 2, cols.reshape(-1))], dim=-1)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim), table], dim=0)
    return table


def resize_grid_embedding(table: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubically resize a square [g*g, C] table to [height*width, C] (align_corners=False)."""
    grid = int(round(table.shape[0] ** 0.5))
    if grid * grid != table.shape[0]:
        raise ValueError(f"position table with {table.shape[0]} rows is not a square grid")
    if (height, width) == (grid, grid):
        return table
    image = table.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)  # [1, C, g, g]
    image = F.interpolate(image.float(), size=(height, width), mode="bicubic", align_corners=False).to(table.dtype)
    return image.permute(0, 2, 3, 1).reshape(height * width, -1)
