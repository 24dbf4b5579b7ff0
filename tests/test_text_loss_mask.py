"""``text_loss_mask``: which tokens may be text-loss targets (SFT prompts are not), on top of the official rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from comfy_mm_interleaved.config import MMInterleavedConfig, SpecialTokens
from comfy_mm_interleaved.models.masks import IGNORE_INDEX, text_targets
from comfy_mm_interleaved.models.mm_interleaved import MMInterleaved

TOKENS = SpecialTokens(bos_token_id=1, eos_token_id=2, pad_token_id=9, boi_token_id=10, image_token_id=11)
X = IGNORE_INDEX


def test_mask_indexes_the_target_token_on_top_of_the_official_rules() -> None:
    # row 0: <s> BOI img img q q ans </s> pad  (a single-turn SFT document, prompt = <s> .. q q)
    # row 1: <s> q a q a </s> <s> q a           (two packed documents, the first with two turns)
    text_ids = torch.tensor([[1, 10, 11, 11, 5, 6, 7, 2, 9], [1, 5, 7, 6, 7, 2, 1, 5, 7]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 0], [1] * 9])
    mask = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 0], [0, 0, 1, 0, 1, 1, 0, 0, 1]])
    official = text_targets(text_ids, attention, TOKENS)
    # targets[:, j] is token j + 1; official rules: BOI after <s>, <|image|>, pad / masked, <s> are ignored
    assert official.tolist() == [[X, X, X, 5, 6, 7, 2, X], [5, 7, 6, 7, 2, X, 5, 7]]
    got = text_targets(text_ids, attention, TOKENS, text_loss_mask=mask)
    assert got.tolist() == [[X, X, X, X, X, 7, 2, X], [X, 7, X, 7, 2, X, X, 7]]
    # a row-start prompt mask is the official ignore_prompt_token_offset
    offset = torch.tensor([6, 2])
    prefix = (torch.arange(9)[None, :] >= offset[:, None]).long()
    assert torch.equal(
        text_targets(text_ids, attention, TOKENS, text_loss_mask=prefix),
        text_targets(text_ids, attention, TOKENS, prompt_length=offset),
    )


def test_mask_combines_with_the_no_image_rule() -> None:
    # <s> a b BOI img c d </s>: with ignore_text_without_image, a and b (no image before them) are ignored
    text_ids = torch.tensor([[1, 5, 6, 10, 11, 7, 8, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 1, 1]])
    got = text_targets(text_ids, torch.ones_like(text_ids), TOKENS, True, text_loss_mask=mask)
    assert got.tolist() == [[X, X, 10, X, X, 8, 2]]


def test_mask_of_the_wrong_shape_is_an_error() -> None:
    text_ids = torch.tensor([[1, 5, 2]])
    with pytest.raises(ValueError, match="text_loss_mask"):
        text_targets(text_ids, torch.ones_like(text_ids), TOKENS, text_loss_mask=torch.ones(1, 2))


def test_model_text_loss_is_the_mean_over_the_masked_targets() -> None:
    config = MMInterleavedConfig.tiny(12)
    model = MMInterleaved(config, with_visual_tokenizer=False, with_image_decoder=False).eval()
    tokens = config.special_tokens
    text_ids = torch.tensor([[1, 5, 6, 7, 8, 2], [1, 5, 6, 2, 1, 7]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 1]])
    assert tokens.bos_token_id == 1 and tokens.eos_token_id == 2
    out = model(text_ids, text_loss_mask=mask, return_intermediates=True)
    # hand-picked (row, position predicting, target): row 0 predicts 7 8 </s>, row 1 predicts 6 </s> 7
    picks = [(0, 2, 7), (0, 3, 8), (0, 4, 2), (1, 1, 6), (1, 2, 2), (1, 4, 7)]
    logits = torch.stack([out.text_logits[b, p] for b, p, _ in picks])
    expected = F.cross_entropy(logits, torch.tensor([t for *_, t in picks]))
    torch.testing.assert_close(out.loss_txt, expected)
    targets = out.intermediates["out.gt_text_ids"]
    assert targets.tolist() == [[X, X, 7, 8, 2], [X, 6, 2, X, 7]]
