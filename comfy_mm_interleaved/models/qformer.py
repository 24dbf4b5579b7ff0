"""BLIP-2 Q-Former driven by learned queries (the official ``PerceiverResampler``).

Same maths and parameter names as transformers' ``Blip2QFormerModel`` (4.31) when it is called with query
embeddings only, plus the official optional qk-norm: a per-head LayerNorm on the queries and keys of *every*
attention (self- and cross-attention), applied after the head split and before the dot product.

    queries [1, Q, D] -> layernorm -> dropout -> N x layer -> [B, Q, D]
    layer:  x = LN(x + SelfAttn(x))                       (post-LN residual blocks)
            x = LN(x + CrossAttn(x, encoder_states))      (only when N % cross_attention_frequency == 0)
            x = LN(x + FFN(x))                            (dense -> act -> dense)

State-dict layout (relative to the resampler): ``queries``, ``blip2qformer.layernorm.*``,
``blip2qformer.encoder.layer.N.{attention,crossattention}.{attention.{query,key,value[,q_norm,k_norm]},
output.{dense,LayerNorm}}``, ``blip2qformer.encoder.layer.N.{intermediate_query.dense,
output_query.{dense,LayerNorm}}``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.activations import ACT2FN

from ..config import QFormerConfig


class QFormerMultiHeadAttention(nn.Module):
    """Multi-head attention of ``hidden_states`` over ``context`` (itself for self-attention)."""

    def __init__(self, config: QFormerConfig, context_dim: int) -> None:
        super().__init__()
        if config.hidden_size % config.num_attention_heads != 0:
            raise ValueError(
                f"Q-Former hidden_size {config.hidden_size} is not divisible by "
                f"num_attention_heads {config.num_attention_heads}"
            )
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.dropout_p = config.attention_probs_dropout_prob
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(context_dim, config.hidden_size)
        self.value = nn.Linear(context_dim, config.hidden_size)
        if config.qk_normalization:
            self.q_norm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)
            self.k_norm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)
        else:
            self.q_norm = self.k_norm = nn.Identity()

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # [B, L, H*d] -> [B, H, L, d]
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(
        self, hidden_states: torch.Tensor, context: torch.Tensor, additive_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        q = self.q_norm(self._split_heads(self.query(hidden_states)))  # [B, H, Q, d]
        k = self.k_norm(self._split_heads(self.key(context)))  # [B, H, S, d]
        v = self._split_heads(self.value(context))  # [B, H, S, d]
        dropout_p = self.dropout_p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask, dropout_p=dropout_p)
        return out.transpose(1, 2).flatten(2)  # [B, Q, H*d]


class QFormerResidualOutput(nn.Module):
    """``LayerNorm(dropout(dense(x)) + residual)``: the output half of every post-LN block."""

    def __init__(self, config: QFormerConfig, in_dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_dim, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class QFormerAttentionBlock(nn.Module):
    """Attention + residual output (``attention`` or ``crossattention`` of a layer)."""

    def __init__(self, config: QFormerConfig, context_dim: int) -> None:
        super().__init__()
        self.attention = QFormerMultiHeadAttention(config, context_dim)
        self.output = QFormerResidualOutput(config, config.hidden_size)

    def forward(
        self, hidden_states: torch.Tensor, context: torch.Tensor, additive_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.output(self.attention(hidden_states, context, additive_mask), hidden_states)


class QFormerIntermediate(nn.Module):
    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class QFormerLayer(nn.Module):
    def __init__(self, config: QFormerConfig, has_cross_attention: bool) -> None:
        super().__init__()
        self.attention = QFormerAttentionBlock(config, config.hidden_size)
        self.crossattention = QFormerAttentionBlock(config, config.encoder_hidden_size) if has_cross_attention else None
        self.intermediate_query = QFormerIntermediate(config)
        self.output_query = QFormerResidualOutput(config, config.intermediate_size)

    def forward(
        self, x: torch.Tensor, encoder_hidden_states: torch.Tensor, encoder_mask: torch.Tensor | None
    ) -> torch.Tensor:
        x = self.attention(x, x)
        if self.crossattention is not None:
            x = self.crossattention(x, encoder_hidden_states, encoder_mask)
        return self.output_query(self.intermediate_query(x), x)


class QFormerEncoder(nn.Module):
    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            QFormerLayer(config, has_cross_attention=i % config.cross_attention_frequency == 0)
            for i in range(config.num_hidden_layers)
        )


class QFormerModel(nn.Module):
    """The ``blip2qformer`` submodule: input LayerNorm + dropout, then the layer stack."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.encoder = QFormerEncoder(config)
        self.gradient_checkpointing = config.gradient_checkpointing

    def forward(
        self, query_embeds: torch.Tensor, encoder_hidden_states: torch.Tensor, encoder_mask: torch.Tensor | None
    ) -> torch.Tensor:
        x = self.dropout(self.layernorm(query_embeds))
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.encoder.layer:
            if use_checkpoint:
                x = checkpoint(layer, x, encoder_hidden_states, encoder_mask, use_reentrant=False)
            else:
                x = layer(x, encoder_hidden_states, encoder_mask)
        return x


def additive_key_mask(mask: torch.Tensor, batch: int, length: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, S] keep-mask (1 = attend) -> [B, 1, 1, S] additive bias: 0 where kept, dtype-min where masked."""
    if mask.shape != (batch, length):
        raise ValueError(
            f"encoder_attention_mask must have shape [batch, seq] = [{batch}, {length}] (1 = attend, 0 = ignore), "
            f"got {tuple(mask.shape)}"
        )
    keep = mask.to(dtype)
    return ((1.0 - keep) * torch.finfo(dtype).min)[:, None, None, :]


class QFormerResampler(nn.Module):
    """``num_queries`` learned queries cross-attending to ``encoder_hidden_states`` -> [B, num_queries, hidden]."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.queries = nn.Parameter(torch.zeros(1, config.num_queries, config.hidden_size))
        self.blip2qformer = QFormerModel(config)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official initialisation: N(0, initializer_range) for queries and linear weights, zero biases."""
        std = self.config.initializer_range
        nn.init.normal_(self.queries, std=std)
        for module in self.blip2qformer.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(
        self, encoder_hidden_states: torch.Tensor, encoder_attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """encoder_hidden_states [B, S, E], encoder_attention_mask [B, S] (1 = attend) or None -> [B, Q, D]."""
        expected = self.config.encoder_hidden_size
        if encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[-1] != expected:
            raise ValueError(
                f"encoder_hidden_states must have shape [batch, seq, {expected}], "
                f"got {tuple(encoder_hidden_states.shape)}"
            )
        batch, length, _ = encoder_hidden_states.shape
        mask = None
        if encoder_attention_mask is not None:
            mask = additive_key_mask(encoder_attention_mask, batch, length, encoder_hidden_states.dtype)
        queries = self.queries.expand(batch, -1, -1)
        return self.blip2qformer(queries, encoder_hidden_states, mask)
