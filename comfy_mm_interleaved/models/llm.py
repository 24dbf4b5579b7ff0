"""The decoder LLM: transformers' ``LlamaModel`` whose every k-th layer carries a gated MMFS cross-attention.

Inside an MMFS layer (OFFICIAL_MODEL.md section 2.3)::

    h = h + SelfAttn(RMSNorm(h))
    h = h + tanh(gate) * MMFS(query = norm1(h), values = norm2(image features), visibility mask)
    h = h + MLP(RMSNorm(h))

Everything but the middle line is transformers' own LLaMA (``LlamaModel.forward``, its attention, MLP, norms,
rotary embedding and KV cache). The per-call image inputs travel as one typed keyword, ``mmfs=MMFSInputs(...)``,
which ``LlamaModel.forward`` hands to every decoder layer. State-dict keys are the official ones
(``layers.N.llama_cross_attn.{gate, norm1, norm2, attn.*}``); the rotary ``inv_freq`` is a non-persistent buffer,
as in the official checkpoint (which has none).

MMFS ablation: a gated block whose ``mmfs_enabled`` attribute is False contributes exactly zero, as if
``tanh(gate) = 0`` (see :mod:`.ablation` for the switch over a whole model).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from ..config import MMInterleavedConfig
from .mmfs import MMFS

REFERENCE_POINT = 0.5  # every token samples around the image centre (x, y) = (0.5, 0.5)


@dataclass
class MMFSInputs:
    """What the MMFS layers read in one call, shared by all of them.

    ``visibility`` [B, Lm, n_slot] (0/1): token t may read image slot n. Lm is the query length, or any length
    during KV-cached decoding, where MMFS uses the last row (a new token sees what the last prompt token saw).
    ``spatial_shapes`` [n_slot * n_levels, 2] long (H, W) and ``level_start_index`` [n_slot * n_levels] describe
    ``features`` [B, n_slot, S, image_embed_dim]: every slot's levels flattened row-major and concatenated.
    ``values`` optionally maps an MMFS layer index to that layer's projected values
    (:meth:`MMDecoder.project_mmfs_values`), so a prompt's images are projected once for all decoding steps;
    a layer without an entry projects ``features`` itself.
    """

    visibility: torch.Tensor
    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor
    features: torch.Tensor | None = None
    values: dict[int, torch.Tensor] | None = None

    def with_visibility(self, visibility: torch.Tensor) -> MMFSInputs:
        return MMFSInputs(visibility, self.spatial_shapes, self.level_start_index, self.features, self.values)


def flatten_levels(maps: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature maps [N, C, h_l, w_l] -> features [N, sum(h_l * w_l), C] and their (H, W) table [n_levels, 2]."""
    features = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)
    shapes = torch.tensor([tuple(m.shape[-2:]) for m in maps], dtype=torch.long, device=features.device)
    return features, shapes


def slot_spatial_layout(level_shapes: torch.Tensor, n_slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W) per level [L, 2] -> per (slot, level) shapes [n_slot * L, 2] and level start indices [n_slot * L]."""
    shapes = level_shapes.repeat(n_slot, 1)
    sizes = shapes.prod(1)
    return shapes, sizes.cumsum(0) - sizes


class GatedMMFSCrossAttention(nn.Module):
    """``tanh(gate) * MMFS(norm1(h), norm2(features))``; official name ``llama_cross_attn``.

    ``mmfs_enabled`` (not a weight; True by default): False switches the block off for an ablation, its
    contribution is then exactly zero (the MMFS is not run).
    """

    def __init__(self, config: MMInterleavedConfig, layer_idx: int) -> None:
        super().__init__()
        llm, mmfs = config.llm, config.llm.mmfs
        self.layer_idx = layer_idx
        self.mmfs_enabled = True
        self.gate = nn.Parameter(torch.zeros(1))
        self.norm1 = LlamaRMSNorm(llm.hidden_size, eps=llm.rms_norm_eps)
        self.norm2 = LlamaRMSNorm(config.image_embed_dim, eps=llm.rms_norm_eps)
        self.attn = MMFS(
            d_query=llm.hidden_size,
            d_value=config.image_embed_dim,
            d_out=llm.hidden_size,
            value_dim=mmfs.value_dim,
            n_levels=len(mmfs.spatial_shapes),
            n_heads=mmfs.n_heads,
            n_points=mmfs.n_points,
            spatial_shapes=mmfs.spatial_shapes,
            base_spatial_shape=mmfs.base_spatial_shape,
            max_num_images=mmfs.max_num_images,
            offset_init_magnitude=mmfs.offset_init_magnitude,
        )

    def project_values(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, n_slot, S, image_embed_dim] -> values [B, n_slot * S, heads, head_dim]."""
        return self.attn.project_values(self.norm2(features))

    def forward(self, hidden_states: torch.Tensor, mmfs: MMFSInputs) -> torch.Tensor:
        """hidden_states [B, Lq, hidden] -> the gated amount to add to them [B, Lq, hidden]."""
        if not self.mmfs_enabled:
            return torch.zeros_like(hidden_states)
        if mmfs.values is not None and self.layer_idx in mmfs.values:
            values = mmfs.values[self.layer_idx]
        elif mmfs.features is not None:
            values = self.project_values(mmfs.features.to(hidden_states.dtype))
        else:
            raise ValueError(f"MMFS layer {self.layer_idx}: MMFSInputs carries neither features nor its values")
        query = self.norm1(hidden_states)
        reference_points = query.new_full((1, 1, 1, 2), REFERENCE_POINT).expand(1, query.shape[1], 1, 2)
        out = self.attn(
            query,
            reference_points,
            None,
            mmfs.spatial_shapes,
            mmfs.level_start_index,
            mmfs.visibility,
            values=values,
        )
        return out * self.gate.tanh()


class MMFSDecoderLayer(LlamaDecoderLayer):
    """A transformers LLaMA decoder layer with an optional MMFS block between self-attention and MLP."""

    def __init__(self, config: LlamaConfig, layer_idx: int, cross_attn: GatedMMFSCrossAttention | None) -> None:
        super().__init__(config, layer_idx)
        self.llama_cross_attn = cross_attn

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        mmfs: MMFSInputs | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        if self.llama_cross_attn is not None:
            if mmfs is None:
                raise ValueError(
                    "the decoder LLM has MMFS layers: pass mmfs=MMFSInputs(...) (for text-only input, one "
                    "invisible all-zero image slot reproduces the official model)"
                )
            hidden_states = hidden_states + self.llama_cross_attn(hidden_states, mmfs)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


def llama_config(config: MMInterleavedConfig) -> LlamaConfig:
    """The transformers ``LlamaConfig`` of the decoder LLM."""
    llm = config.llm
    return LlamaConfig(
        vocab_size=config.txt_vocab_size,
        hidden_size=llm.hidden_size,
        intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_hidden_layers,
        num_attention_heads=llm.num_attention_heads,
        num_key_value_heads=llm.num_key_value_heads,
        hidden_act=llm.hidden_act,
        max_position_embeddings=llm.max_position_embeddings,
        rms_norm_eps=llm.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": llm.rope_theta},
        bos_token_id=config.special_tokens.bos_token_id,
        eos_token_id=config.special_tokens.eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,
        attn_implementation=llm.attn_implementation,
    )


class MMDecoder(LlamaModel):
    """``LlamaModel`` (its own ``forward``) with MMFS layers at ``config.llm.mmfs_layer_indices()``.

    Call it like ``LlamaModel`` plus ``mmfs=MMFSInputs(...)``; the output is transformers'
    ``BaseModelOutputWithPast`` (``last_hidden_state`` after the final RMSNorm; the KV ``cache`` with
    ``use_cache=True``). ``config.llm.gradient_checkpointing`` turns on transformers' (non-reentrant) activation
    checkpointing of every layer in training mode; the MMFS inputs are recomputed with the layer.
    """

    def __init__(self, config: MMInterleavedConfig) -> None:
        llama = llama_config(config)
        # LlamaModel.__init__ would build plain layers only to discard them (26 GB at 13B): build the same
        # attributes here, with our layers, and keep LlamaModel.forward.
        LlamaPreTrainedModel.__init__(self, llama)
        self.padding_idx = llama.pad_token_id
        self.vocab_size = llama.vocab_size
        self.embed_tokens = nn.Embedding(llama.vocab_size, llama.hidden_size, self.padding_idx)
        mmfs_layers = set(config.llm.mmfs_layer_indices())
        self.layers = nn.ModuleList(
            MMFSDecoderLayer(llama, i, GatedMMFSCrossAttention(config, i) if i in mmfs_layers else None)
            for i in range(llama.num_hidden_layers)
        )
        self.norm = LlamaRMSNorm(llama.hidden_size, eps=llama.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=llama)
        self.gradient_checkpointing = False
        self.post_init()
        if config.llm.gradient_checkpointing:
            self.activation_checkpointing_enable()

    def _init_weights(self, module: nn.Module) -> None:
        """transformers' LLaMA init, then the official MMFS init (MMFS reset after the LLM init, gates at 0)."""
        super()._init_weights(module)
        if isinstance(module, MMFS):
            module.reset_parameters()
        elif isinstance(module, GatedMMFSCrossAttention):
            nn.init.zeros_(module.gate)

    def mmfs_layers(self) -> Iterator[GatedMMFSCrossAttention]:
        for layer in self.layers:
            if layer.llama_cross_attn is not None:
                yield layer.llama_cross_attn

    def project_mmfs_values(self, features: torch.Tensor) -> dict[int, torch.Tensor]:
        """Every MMFS layer's values of ``features`` [B, n_slot, S, C] (for :attr:`MMFSInputs.values`).

        Values are image-major, so the values of images projected separately can be concatenated on dim 1.
        """
        features = features.to(self.embed_tokens.weight.dtype)
        return {attn.layer_idx: attn.project_values(features) for attn in self.mmfs_layers()}

    def set_official_trainable(self) -> None:
        """Official split: the LLM is frozen except its MMFS blocks (whose null-slot ``ignore_token`` stays fixed)."""
        self.requires_grad_(False)
        for attn in self.mmfs_layers():
            attn.requires_grad_(True)
            attn.attn.ignore_token.requires_grad_(False)
