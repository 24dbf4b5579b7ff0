"""Multi-modal Feature Synchronizer (MMFS): multi-image, multi-scale deformable cross-attention.

For query t, image n, head h, level l, point p (OFFICIAL_MODEL.md section 2.2):

    r_n      recency of image n among the images t can see (1 = most recent, 0 = invisible)
    q_n      = W_dom q_t + b_dom + E[r_n]                     (per-image query)
    d_nhp    = W_off q_n + b_off                               (offset, shared by all levels, (x, y))
    loc_nhlp = ref_t + d_nhp * (s_l / base) / (W_nl, H_nl)     (normalised location)
    a_nhlp   = (W_att q_n + b_att)[h, l, p] - 10000 * [n invisible]
    w        = softmax over (n, l, p) and one null slot of logit 0
    out_h    = sum w * bilinear(V_nlh, loc) + w_null * ignore_token_h,   V = value_proj(features)

Because W_off and W_att are linear, ``W(q_n) = W(W_dom q_t + b_dom) + W E[r_n]``: the per-token part is computed
once per token and the per-image part is a table lookup over the (few) recency indices, so nothing of shape
``[N, Lq, n_img, d_query]`` is ever built. This is algebraically the official computation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import ms_deform_attn
from ..ops.backend import mmfs_fused_enabled
from ..ops.mmfs_fused import mmfs_fused_sampling

MASKED_LOGIT = -10000.0


def image_recency_index(visible: torch.Tensor) -> torch.Tensor:
    """``visible`` [..., n_img] (0/1) -> recency index [..., n_img] (long): 1 = most recent visible, 0 = invisible."""
    visible = visible.to(torch.long)
    count = visible.sum(-1, keepdim=True)
    return (count + 1 - visible.cumsum(-1)) * visible


class MMFS(nn.Module):
    """One MMFS attention. Parameter names follow the official checkpoint (``...attn.*``)."""

    def __init__(
        self,
        d_query: int,
        d_value: int,
        d_out: int,
        value_dim: int,
        n_levels: int,
        n_heads: int,
        n_points: int,
        spatial_shapes: Sequence[int],
        base_spatial_shape: int,
        max_num_images: int,
        offset_init_magnitude: float = 1.0,
    ) -> None:
        super().__init__()
        if value_dim % n_heads != 0:
            raise ValueError(f"MMFS value_dim {value_dim} must be divisible by n_heads {n_heads}")
        if len(spatial_shapes) != n_levels:
            raise ValueError(f"MMFS expects {n_levels} constructor spatial shapes, got {list(spatial_shapes)}")
        self.d_query, self.d_value, self.d_out, self.value_dim = d_query, d_value, d_out, value_dim
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.head_dim = value_dim // n_heads
        self.base_spatial_shape = base_spatial_shape
        self.max_num_images = max_num_images
        self.offset_init_magnitude = offset_init_magnitude

        self.dynamic_offset_mask = nn.Linear(d_query, d_query)
        self.query_relpos = nn.Embedding(max_num_images, d_query)
        self.sampling_offsets = nn.Linear(d_query, n_heads * n_points * 2)
        self.attention_weights = nn.Linear(d_query, n_heads * n_levels * (n_points + 1))
        self.value_proj = nn.Linear(d_value, value_dim)
        self.output_proj = nn.Linear(value_dim, d_out)
        # Value of the null slot. Zero and frozen in the release.
        self.ignore_token = nn.Parameter(torch.zeros(1, 1, 1, value_dim), requires_grad=False)
        self.register_buffer(
            "scale_ratios",
            torch.tensor([s / base_spatial_shape for s in spatial_shapes], dtype=torch.float32),
            persistent=False,
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Official ``_reset_parameters``: zero offset weights, offsets in +-magnitude, xavier projections."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        bias = torch.empty(self.n_heads, 1, self.n_points, 2).uniform_(
            -self.offset_init_magnitude, self.offset_init_magnitude
        )
        self.sampling_offsets.bias.copy_(bias.flatten())
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.constant_(self.dynamic_offset_mask.bias, 0.0)
        nn.init.trunc_normal_(self.query_relpos.weight, std=0.02)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    # ------------------------------------------------------------------------------------------------------
    def project_values(self, features: torch.Tensor) -> torch.Tensor:
        """``features`` [N, n_img, S, d_value] -> values [N, n_img * S, heads, head_dim] (cacheable per image)."""
        n, n_img, s, _ = features.shape
        return self.value_proj(features).view(n, n_img * s, self.n_heads, self.head_dim)

    def sampling_factors(
        self, query: torch.Tensor, visible: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Recency index and the per-token / per-recency parts of the offsets and logits (see the module doc).

        query [N, Lq, d_query]; visible [N, Lq, n_img] (0/1). Returns recency [N, Lq, n_img] (long),
        off_token [N, Lq, H*P*2], off_table [R, H*P*2], att_token [N, Lq, H*L*(P+1)], att_table [R, H*L*(P+1)]
        (R = max_num_images), in the query's dtype, before the image mask.
        """
        recency = image_recency_index(visible)  # [N, Lq, n_img]
        # The recency index never exceeds n_img, so the (host-syncing) value check is needed only when the image
        # axis is long enough to overflow the relative-position table.
        if visible.shape[-1] >= self.max_num_images and recency.numel() and int(recency.max()) >= self.max_num_images:
            raise ValueError(
                f"MMFS sees {int(recency.max())} images but was built for at most {self.max_num_images - 1}; "
                "shorten the document or drop earlier images"
            )
        base_query = F.linear(query, self.dynamic_offset_mask.weight, self.dynamic_offset_mask.bias)
        off_token = self.sampling_offsets(base_query)
        off_table = F.linear(self.query_relpos.weight, self.sampling_offsets.weight)
        att_token = self.attention_weights(base_query)
        att_table = F.linear(self.query_relpos.weight, self.attention_weights.weight)
        return recency, off_token, off_table, att_token, att_table

    def level_normaliser(self, spatial_shapes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """spatial_shapes [n_img * L, 2] (H, W) -> [n_img, L, 2]: (W, H) / (s_l / base), the offset divisor."""
        shapes = spatial_shapes.to(dtype).view(-1, self.n_levels, 2)
        return torch.stack([shapes[..., 1], shapes[..., 0]], -1) / self.scale_ratios.to(dtype)[:, None]

    def sampling_plan(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: torch.Tensor,
        visible: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sampling locations, weights and the null-slot weight.

        query [N, Lq, d_query]; reference_points [N or 1, Lq, 1, 2]; spatial_shapes [n_img * L, 2] (H, W);
        visible [N, Lq, n_img] (0/1).
        Returns loc [N, Lq, H, n_img*L, P, 2] (fp32 or fp64), weights [N, Lq, H, n_img*L, P], null [N, Lq, H].
        """
        n, lq, _ = query.shape
        n_img = visible.shape[-1]
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        compute_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32

        # per-token parts [N, Lq, 1, *] plus per-recency table rows
        recency, off_token, off_table, att_token, att_table = self.sampling_factors(query, visible)
        offsets = off_token.unsqueeze(2) + off_table[recency]
        offsets = offsets.view(n, lq, n_img, heads, points, 2).to(compute_dtype)
        logits = (att_token.unsqueeze(2) + att_table[recency]).view(n, lq, n_img, heads, levels, points + 1)
        logits = logits[..., :points].to(compute_dtype)
        logits = logits + (1.0 - visible.to(compute_dtype))[..., None, None, None] * MASKED_LOGIT

        # joint softmax over images x levels x points plus a null slot with logit 0
        flat = logits.permute(0, 1, 3, 2, 4, 5).reshape(n, lq, heads, n_img * levels * points)
        flat = torch.cat([flat, flat.new_zeros(n, lq, heads, 1)], dim=-1)
        probs = flat.softmax(-1)
        weights = probs[..., :-1].reshape(n, lq, heads, n_img * levels, points).contiguous()
        null_weight = probs[..., -1]

        # locations: ref + offset * (s_l / base) / (W, H), offsets shared over levels
        normaliser = self.level_normaliser(spatial_shapes, compute_dtype)  # [n_img, L, 2]
        offsets = offsets.permute(0, 1, 3, 2, 4, 5)  # [N, Lq, H, n_img, P, 2]
        loc = torch.addcdiv(  # one pass, in the op's layout [N, Lq, H, n_img, L, P, 2] (unless a size is 1)
            reference_points.to(compute_dtype)[:, :, 0][:, :, None, None, None, None, :],
            offsets[:, :, :, :, None],
            normaliser[None, None, None, :, :, None, :],
        )
        loc = loc.reshape(n, lq, heads, n_img * levels, points, 2).contiguous()
        return loc, weights, null_weight

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor | None,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        attention_mask: torch.Tensor,
        values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query [N, Lq, d_query]; input_flatten [N, n_img, S, d_value]; attention_mask [N, n_img] or [N, Lq', n_img]
        (for a 3-D mask with Lq' != Lq, only its last row is used: KV-cached decoding). ``values`` may carry
        precomputed :meth:`project_values` output instead of ``input_flatten``. Returns [N, Lq, d_out]."""
        n, lq, _ = query.shape
        if values is None:
            if input_flatten is None:
                raise ValueError("MMFS needs input_flatten or precomputed values")
            values = self.project_values(input_flatten)
        visible = attention_mask
        if visible.dim() == 2:
            visible = visible[:, None, :].expand(n, lq, visible.shape[-1])
        elif visible.shape[1] != lq:
            visible = visible[:, -1:, :].expand(n, lq, visible.shape[-1])
        visible = (visible > 0).to(query.dtype)
        if mmfs_fused_enabled(values.device):  # one Triton kernel: no [N, Lq, H, n_img*L, P] tensors
            sampled, null_weight = mmfs_fused_sampling(
                self, query, reference_points, values, spatial_shapes, level_start_index, visible
            )
        else:
            loc, weights, null_weight = self.sampling_plan(query, reference_points, spatial_shapes, visible)
            sampled = ms_deform_attn(values, spatial_shapes, level_start_index, loc, weights)  # [N, Lq, H*dh]
        null = null_weight.to(sampled.dtype)[..., None] * self.ignore_token.view(1, 1, self.n_heads, self.head_dim)
        out = sampled + null.reshape(n, lq, self.value_dim).to(sampled.dtype)
        return self.output_proj(out.to(query.dtype))
