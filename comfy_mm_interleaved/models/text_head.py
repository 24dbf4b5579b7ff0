"""Text head: a frozen copy of the LLM's ``lm_head`` plus a small trainable head for the added tokens.

``logits = head(h)``; ``logits[..., orig_vocab:] += head_new(h)``. The rows of ``head`` for the added tokens
(``<|beginofimage|>``, ``<|image|>``) are weight 0 / bias -100 and ``head_new`` starts at weight 0 / bias 95, so
the added tokens start at logit -5 (OFFICIAL_MODEL.md section 1.4). Official name: ``text_decoder``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import MMInterleavedConfig

NEW_ROWS_BIAS = -100.0
HEAD_NEW_BIAS = 95.0


class TextDecoder(nn.Module):
    def __init__(self, config: MMInterleavedConfig) -> None:
        super().__init__()
        hidden, vocab, orig = config.llm.hidden_size, config.txt_vocab_size, config.orig_vocab_size
        if not 0 < orig < vocab:
            raise ValueError(f"orig_vocab_size {orig} must be positive and below txt_vocab_size {vocab}")
        self.orig_vocab_size = orig
        self.head = nn.Linear(hidden, vocab)  # rows < orig_vocab_size: a copy of the LLM's lm_head
        self.head_new = nn.Linear(hidden, vocab - orig)
        self.reset_parameters()
        self.head.requires_grad_(False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Official init of everything the LLM's ``lm_head`` does not provide."""
        nn.init.zeros_(self.head.bias)
        nn.init.zeros_(self.head.weight[self.orig_vocab_size :])
        nn.init.constant_(self.head.bias[self.orig_vocab_size :], NEW_ROWS_BIAS)
        nn.init.zeros_(self.head_new.weight)
        nn.init.constant_(self.head_new.bias, HEAD_NEW_BIAS)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [..., hidden] -> logits [..., txt_vocab_size]."""
        logits = self.head(hidden_states)
        logits[..., self.orig_vocab_size :] += self.head_new(hidden_states)
        return logits
