"""Input handling of MMInterleaved: hand-computed masks, targets and indices on toy rows, defaults computed from
the tokens, the text-only path, the text head's initial logits, and clear errors for bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from comfy_mm_interleaved.models.masks import (
    IGNORE_INDEX,
    context_positions,
    image_layout,
    llm_visibility,
    text_targets,
    unet_mmfs_source,
)
from comfy_mm_interleaved.models.mm_interleaved import MMInterleaved, text_loss
from comfy_mm_interleaved.models.text_head import TextDecoder
from conftest import assert_close, load_case
from helpers_model import fixture_visual, forward_kwargs, tiny_config, tiny_model

CONFIG = tiny_config()
TOKENS = CONFIG.special_tokens
K = CONFIG.num_img_token
WORD = 7  # an ordinary text id


def toy_row(*parts: str) -> list[int]:
    """ "<s>", "</s>", "pad", "t" (a word) or "IMG" (<BOI> + K <|image|>)."""
    ids = {"<s>": [TOKENS.bos_token_id], "</s>": [TOKENS.eos_token_id], "pad": [TOKENS.pad_token_id], "t": [WORD]}
    ids["IMG"] = [TOKENS.boi_token_id] + [TOKENS.image_token_id] * K
    return [i for part in parts for i in ids[part]]


# <s> t IMG t </s> <s> IMG t IMG t   (image 0 in document 0; images 1, 2 in document 1, image-first)
ROW = toy_row("<s>", "t", "IMG", "t", "</s>", "<s>", "IMG", "t", "IMG", "t")
BOI = [2, 6 + K, 8 + 2 * K]  # positions of the three BOI tokens
DOC1 = 5 + K  # position of the second <s>


def toy_layout():
    text_ids = torch.tensor([ROW])
    return text_ids, image_layout(text_ids, torch.tensor([3]), TOKENS, K)


def test_toy_layout_by_hand() -> None:
    _, layout = toy_layout()
    assert layout.boi.tolist() == BOI and layout.row.tolist() == [0, 0, 0] and layout.slot.tolist() == [0, 1, 2]
    assert layout.image_doc_start().tolist() == [0, DOC1, DOC1]


def test_llm_visibility_by_hand() -> None:
    text_ids, layout = toy_layout()
    visible = llm_visibility(layout, 1, len(ROW))[0]  # [L, 3]
    expected = torch.zeros(len(ROW), 3, dtype=torch.bool)
    expected[BOI[0] + 1 : DOC1, 0] = True  # image 0 from its first image token to the end of document 0
    expected[BOI[1] + 1 :, 1] = True  # a BOI does not see its own image; its image tokens do
    expected[BOI[2] + 1 :, 2] = True
    assert torch.equal(visible, expected)


def test_text_targets_by_hand() -> None:
    text_ids, _ = toy_layout()
    text_ids = torch.cat([text_ids, torch.tensor([toy_row("pad", "t")])], 1)  # a pad and a masked-out word
    mask = torch.ones_like(text_ids)
    mask[0, -1] = 0
    targets = text_targets(text_ids, mask, TOKENS)[0]
    nxt = text_ids[0, 1:]
    kept = torch.ones_like(nxt, dtype=torch.bool)
    kept[nxt == TOKENS.image_token_id] = False
    kept[DOC1 - 1] = False  # the second <s>
    kept[BOI[1] - 1] = False  # a BOI right after <s>
    kept[-2:] = False  # pad, masked position
    assert torch.equal(targets, torch.where(kept, nxt, IGNORE_INDEX))

    without_image = text_targets(text_ids, mask, TOKENS, ignore_text_without_image=True)[0]
    kept[: BOI[0] - 1] = False  # document 0 before its first BOI ("t" at 1); the BOI itself stays a target
    assert torch.equal(without_image, torch.where(kept, nxt, IGNORE_INDEX))

    prompt = text_targets(text_ids, mask, TOKENS, prompt_length=4)[0]
    kept = targets != IGNORE_INDEX
    kept[:3] = False  # targets are tokens 1..L-1: the first 4 tokens are targets 0..2
    assert torch.equal(prompt, torch.where(kept, nxt, IGNORE_INDEX))


def test_context_and_unet_source_by_hand() -> None:
    _, layout = toy_layout()
    doc_start = layout.image_doc_start()
    positions, valid = context_positions(layout, doc_start)
    lengths = [BOI[0] + 1, BOI[1] - DOC1 + 1, BOI[2] - DOC1 + 1]
    assert valid.sum(1).tolist() == lengths and positions.shape[1] == max(lengths)
    for image, length in enumerate(lengths):
        assert positions[image, :length].tolist() == list(range(BOI[image], BOI[image] - length, -1))
    assert unet_mmfs_source(layout, doc_start).tolist() == [-1, -1, 1]  # image 0 is in another document
    assert unet_mmfs_source(layout, torch.zeros(3, dtype=torch.long)).tolist() == [-1, 0, 1]


def test_text_head_initial_logits() -> None:
    head = TextDecoder(CONFIG)
    logits = head(torch.zeros(2, CONFIG.llm.hidden_size))
    orig = CONFIG.orig_vocab_size
    assert torch.equal(logits[:, :orig], torch.zeros(2, orig))
    assert torch.equal(logits[:, orig:], torch.full((2, CONFIG.txt_vocab_size - orig), -5.0))
    assert {n for n, p in head.named_parameters() if p.requires_grad} == {"head_new.weight", "head_new.bias"}


def test_text_loss_without_targets_is_zero() -> None:
    logits = torch.randn(1, 4, 10, requires_grad=True)
    loss = text_loss(logits, torch.full((1, 3), IGNORE_INDEX))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm_model():
    return tiny_model(with_visual_tokenizer=False, with_image_decoder=False)


@pytest.fixture(scope="module")
def case():
    return load_case("forward")


def test_inputs_parity_defaults_from_tokens(llm_model, case) -> None:
    """num_image_per_seq and nearest_bos_idxs computed from the tokens equal the official data pipeline's."""
    kwargs = forward_kwargs(case)
    layout = image_layout(kwargs["text_ids"], kwargs["num_image_per_seq"], TOKENS, K)
    assert torch.equal(layout.image_doc_start(), kwargs["nearest_bos_idxs"])
    kwargs.update(num_image_per_seq=None, nearest_bos_idxs=None)
    with torch.no_grad():
        out = llm_model(**kwargs, visual=fixture_visual(case), return_intermediates=True)
    assert_close(out.intermediates["imgdec.context_features"], case["imgdec.context_features"], 1e-4, "context")
    assert torch.equal(out.intermediates["imgdec.mmfs_source_image"], case["imgdec.mmfs_source_image"])


def test_text_only_parity_prefix(llm_model, case) -> None:
    """A row prefix that sees no image (before the row's first BOI) runs without images and reproduces the
    official hidden states and logits (causal attention; the official MMFS of such tokens reads only its null slot)."""
    is_boi = case["in.text_ids"] == TOKENS.boi_token_id
    first_boi = torch.where(is_boi.any(1), is_boi.int().argmax(1), is_boi.shape[1])
    padding = case["in.attention_mask"] == 0  # (a row without images may be padded: stop before its padding)
    first_pad = torch.where(padding.any(1), padding.int().argmax(1), padding.shape[1])
    prefix = torch.minimum(first_boi, first_pad)
    row = int(prefix.argmax())
    text_ids = case["in.text_ids"][row : row + 1, : int(prefix[row])]
    assert text_ids.shape[1] >= 1
    with torch.no_grad():
        out = llm_model(text_ids, return_intermediates=True)
    length = text_ids.shape[1]
    expected = case["llm.last_hidden_state"][row : row + 1, :length]
    assert_close(out.intermediates["llm.last_hidden_state"], expected, 1e-4, "hidden")
    assert_close(out.text_logits, case["out.text_logits"][row : row + 1, :length], 1e-4, "logits")
    assert out.loss_img is None and torch.isfinite(out.loss)


# ---------------------------------------------------------------------------------------------------------------
def call(model: MMInterleaved, case, **overrides):
    kwargs = forward_kwargs(case) | {"visual": fixture_visual(case)} | overrides
    with torch.no_grad():
        return model(**kwargs)


def test_bad_text_ids(llm_model, case) -> None:
    text_ids = case["in.text_ids"]
    with pytest.raises(TypeError, match="integer tensor"):
        call(llm_model, case, text_ids=text_ids.float())
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        call(llm_model, case, text_ids=text_ids[0])
    wrong = case["in.text_ids"].clone()
    wrong[0, 1] = CONFIG.txt_vocab_size + 5
    with pytest.raises(ValueError, match="must be in"):
        call(llm_model, case, text_ids=wrong)
    with pytest.raises(ValueError, match="attention_mask"):
        call(llm_model, case, attention_mask=case["in.attention_mask"][:, 1:])


def test_bad_image_layout(llm_model, case) -> None:
    counts = case["in.num_image_per_seq"]
    wrong_counts = counts.clone()
    wrong_counts[0] += 1
    with pytest.raises(ValueError, match="BOI tokens but num_image_per_seq"):
        call(llm_model, case, num_image_per_seq=wrong_counts)
    with pytest.raises(ValueError, match="one count per row"):
        call(llm_model, case, num_image_per_seq=counts[:1])
    truncated = case["in.text_ids"].clone()
    first_image_token = int((truncated[0] == TOKENS.image_token_id).nonzero()[0])
    truncated[0, first_image_token] = WORD
    with pytest.raises(ValueError, match=r"<\|image\|> tokens"):
        call(llm_model, case, text_ids=truncated)
    stray = case["in.text_ids"].clone()
    ordinary = ~torch.isin(stray, torch.tensor(TOKENS.all_ids)) & (case["in.attention_mask"] == 1)
    row, position = (int(i) for i in ordinary.nonzero()[0])  # the first ordinary text token
    stray[row, position] = TOKENS.image_token_id
    with pytest.raises(ValueError, match=r"<\|image\|> tokens"):
        call(llm_model, case, text_ids=stray)
    with pytest.raises(ValueError, match="nearest_bos_idxs"):
        call(llm_model, case, nearest_bos_idxs=case["in.nearest_bos_idxs"] + 100)


def test_bad_images(llm_model, case) -> None:
    visual = fixture_visual(case)
    n = visual.vis_embed.shape[0]
    with pytest.raises(ValueError, match="pass image_tensors"):
        call(llm_model, case, visual=None)
    with pytest.raises(ValueError, match="vis_embed"):
        call(llm_model, case, visual=dataclasses.replace(visual, vis_embed=visual.vis_embed[:, 1:]))
    with pytest.raises(ValueError, match="multiscale_features"):
        call(llm_model, case, visual=dataclasses.replace(visual, multiscale_features=visual.multiscale_features[:2]))
    images = torch.rand(n, 3, 8, 8)
    with pytest.raises(ValueError, match="not both"):
        call(llm_model, case, image_tensors=images)
    with pytest.raises(ValueError, match="without its visual tokenizer"):
        call(llm_model, case, visual=None, image_tensors=images)
    for bad, message in [(images[:-1], "one image per <BOI>"), (images[:, :2], r"\[n, 3, H, W\]"), (images[0], "3, H")]:
        with pytest.raises(ValueError, match=message):
            call(llm_model, case, visual=None, image_tensors=bad)


def test_too_many_images_for_mmfs(case) -> None:
    config = tiny_config()
    limit = 2
    config = dataclasses.replace(
        config, llm=dataclasses.replace(config.llm, mmfs=dataclasses.replace(config.llm.mmfs, max_num_images=limit + 1))
    )
    model = MMInterleaved(config, with_visual_tokenizer=False, with_image_decoder=False)
    many = torch.tensor([toy_row("<s>", *["IMG", "t"] * (limit + 1))])
    with pytest.raises(ValueError, match=f"sees {limit + 1} images .* at most {limit}"):
        model(many, image_tensors=torch.rand(limit + 1, 3, 8, 8))
    split = torch.tensor([toy_row("<s>", *["IMG", "t"] * limit, "</s>", "<s>", "IMG", "t")])
    visual = fixture_visual(case)
    visual = dataclasses.replace(
        visual,
        vis_embed=visual.vis_embed[: limit + 1],
        multiscale_features=[m[: limit + 1] for m in visual.multiscale_features],
    )
    with torch.no_grad():
        assert torch.isfinite(model(split, visual=visual).loss)  # documents split the images


def test_bad_generation_arguments(llm_model, case) -> None:
    text_ids = case["in.text_ids"]
    visual = fixture_visual(case)
    mask = torch.ones_like(text_ids)
    mask[:, -1] = 0
    with pytest.raises(ValueError, match="left-padded"):
        llm_model.generate_text(text_ids, attention_mask=mask, visual=visual)
    with pytest.raises(ValueError, match="max_new_tokens"):
        llm_model.generate_text(text_ids, visual=visual, max_new_tokens=0)
