"""ViT-Adapter pieces (czczup/ViT-Adapter design, as used by MM-Interleaved's CLIP encoder).

* :class:`SpatialPriorModule`: a small conv net on the (resized) image giving maps at strides 4/8/16/32.
* :class:`MSDeformAttn`: Deformable-DETR multi-scale deformable attention with a value width ratio.
* :class:`Injector`: ViT tokens attend to the 3 adapter levels (c2, c3, c4); gated by ``gamma``.
* :class:`Extractor`: adapter tokens attend to the ViT tokens, then a conv-FFN (depth-wise 3x3 conv per level).
* :class:`InteractionBlock`: injector + extractor (+ extra extractors on the last block); the ViT layers of the
  block run in between and are owned by the caller.

Reference points follow the adapter's convention: pixel centres ``((j + 0.5) / W, (i + 0.5) / H)`` of the query's
own grid, shared by every level of the sampled features; offsets are normalised by each level's (W, H).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import ms_deform_attn

Shape2D = tuple[int, int]


def pixel_centre_reference_points(shapes: Sequence[Shape2D], device: torch.device) -> torch.Tensor:
    """Normalised (x, y) pixel centres of each (H, W) grid, row-major, concatenated -> [1, sum H*W, 2]."""
    points = []
    for h, w in shapes:
        ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
        xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=-1))
    return torch.cat(points, dim=0)[None]


def level_layout(shapes: Sequence[Shape2D], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W) list -> ``spatial_shapes`` [L, 2] and ``level_start_index`` [L] (long tensors)."""
    spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=device).reshape(-1, 2)
    sizes = spatial_shapes.prod(1)
    return spatial_shapes, torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a [B, C, H, W] map, computed in float32 (eps 1e-6 in the adapter)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(
            x.float().permute(0, 2, 3, 1), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps
        )
        return y.permute(0, 3, 1, 2).to(x.dtype)


def _conv_norm_relu(in_ch: int, out_ch: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False),
        ChannelsFirstLayerNorm(out_ch, eps=1e-6),
        nn.ReLU(inplace=True),
    ]


class SpatialPriorModule(nn.Module):
    """Conv stem + 3 strided convs -> 4 maps (strides 4, 8, 16, 32), each projected to ``embed_dim`` by 1x1 convs."""

    def __init__(self, in_planes: int, embed_dim: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            *_conv_norm_relu(3, in_planes, 2),
            *_conv_norm_relu(in_planes, in_planes, 1),
            *_conv_norm_relu(in_planes, in_planes, 1),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.conv2 = nn.Sequential(*_conv_norm_relu(in_planes, 2 * in_planes, 2))
        self.conv3 = nn.Sequential(*_conv_norm_relu(2 * in_planes, 4 * in_planes, 2))
        self.conv4 = nn.Sequential(*_conv_norm_relu(4 * in_planes, 4 * in_planes, 2))
        self.fc1 = nn.Conv2d(in_planes, embed_dim, kernel_size=1)
        self.fc2 = nn.Conv2d(2 * in_planes, embed_dim, kernel_size=1)
        self.fc3 = nn.Conv2d(4 * in_planes, embed_dim, kernel_size=1)
        self.fc4 = nn.Conv2d(4 * in_planes, embed_dim, kernel_size=1)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """image [B, 3, S, S] -> [c1 [B, C, S/4, S/4], c2 (S/8), c3 (S/16), c4 (S/32)]."""
        f1 = self.stem(image)
        f2 = self.conv2(f1)
        f3 = self.conv3(f2)
        f4 = self.conv4(f3)
        return [self.fc1(f1), self.fc2(f2), self.fc3(f3), self.fc4(f4)]


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable-DETR) whose values have width ``int(d_model * ratio)``."""

    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int, ratio: float) -> None:
        super().__init__()
        self.value_dim = int(d_model * ratio)
        if self.value_dim % n_heads != 0:
            raise ValueError(f"deformable attention value width {self.value_dim} is not divisible by {n_heads} heads")
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, self.value_dim)
        self.output_proj = nn.Linear(self.value_dim, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official model's effective init: zero offsets (all points start on the reference point; the
        Deformable-DETR ray init of the offset bias is wiped by the official transformers ``post_init``, which
        zeroes every Linear bias of the adapter), uniform attention, Xavier value / output projections."""
        for layer in (self.sampling_offsets, self.attention_weights):
            nn.init.zeros_(layer.weight)
        for layer in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(layer.weight)
        for layer in (self.sampling_offsets, self.attention_weights, self.value_proj, self.output_proj):
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        features: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
    ) -> torch.Tensor:
        """query [B, Lq, C], reference_points [1 or B, Lq, 2] (x, y), features [B, S, C] -> [B, Lq, C]."""
        batch, n_query, _ = query.shape
        m, n_levels, n_points = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(features).unflatten(-1, (m, self.value_dim // m))  # [B, S, M, D]
        offsets = self.sampling_offsets(query).view(batch, n_query, m, n_levels, n_points, 2)
        weights = self.attention_weights(query).view(batch, n_query, m, n_levels * n_points).softmax(-1)
        weights = weights.view(batch, n_query, m, n_levels, n_points)
        normaliser = spatial_shapes.flip(-1).to(offsets.dtype)  # [L, 2] as (W, H)
        locations = reference_points[:, :, None, None, None, :] + offsets / normaliser[None, None, None, :, None, :]
        out = ms_deform_attn(value, spatial_shapes, level_start_index, locations.to(value.dtype), weights)
        return self.output_proj(out)


class DWConv(nn.Module):
    """Depth-wise 3x3 conv applied to each level of a flattened multi-level token sequence."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, stride=1, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, shapes: Sequence[Shape2D]) -> torch.Tensor:
        # x [B, sum H*W, C]
        levels = x.split([h * w for h, w in shapes], dim=1)
        out = []
        for tokens, (h, w) in zip(levels, shapes):
            grid = tokens.transpose(1, 2).unflatten(-1, (h, w))  # [B, C, H, W]
            out.append(self.dwconv(grid).flatten(2).transpose(1, 2))
        return torch.cat(out, dim=1)


class ConvFFN(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = DWConv(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor, shapes: Sequence[Shape2D]) -> torch.Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), shapes)))


class Injector(nn.Module):
    """ViT tokens += gamma * DeformAttn(ViT tokens -> adapter levels)."""

    def __init__(self, dim: int, n_heads: int, n_points: int, n_levels: int, ratio: float, init_values: float) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(dim)
        self.feat_norm = nn.LayerNorm(dim)
        self.attn = MSDeformAttn(dim, n_levels, n_heads, n_points, ratio)
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(
        self, query: torch.Tensor, reference_points: torch.Tensor, feat: torch.Tensor, layout: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        attn = self.attn(self.query_norm(query), reference_points, self.feat_norm(feat), *layout)
        return query + self.gamma * attn


class Extractor(nn.Module):
    """Adapter tokens += DeformAttn(adapter tokens -> ViT grid); then += ConvFFN."""

    def __init__(self, dim: int, n_heads: int, n_points: int, ratio: float, cffn_ratio: float) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(dim)
        self.feat_norm = nn.LayerNorm(dim)
        self.attn = MSDeformAttn(dim, 1, n_heads, n_points, ratio)
        self.ffn = ConvFFN(dim, int(dim * cffn_ratio))
        self.ffn_norm = nn.LayerNorm(dim)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        feat: torch.Tensor,
        layout: tuple[torch.Tensor, ...],
        query_shapes: Sequence[Shape2D],
    ) -> torch.Tensor:
        query = query + self.attn(self.query_norm(query), reference_points, self.feat_norm(feat), *layout)
        return query + self.ffn(self.ffn_norm(query), query_shapes)


class InteractionBlock(nn.Module):
    """Injector and extractor(s) of one ViT layer group (the ViT layers themselves belong to the CLIP encoder)."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_points: int,
        ratio: float,
        cffn_ratio: float,
        init_values: float,
        n_extra_extractors: int = 0,
    ) -> None:
        super().__init__()
        self.injector = Injector(dim, n_heads, n_points, 3, ratio, init_values)
        self.extractor = Extractor(dim, n_heads, n_points, ratio, cffn_ratio)
        self.extra_extractors = (
            nn.ModuleList(Extractor(dim, n_heads, n_points, ratio, cffn_ratio) for _ in range(n_extra_extractors))
            if n_extra_extractors
            else None
        )

    def extractors(self) -> list[Extractor]:
        return [self.extractor, *(self.extra_extractors or [])]
