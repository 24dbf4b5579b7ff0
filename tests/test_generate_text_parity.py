"""Greedy KV-cached text generation against the official ``generate_texts`` (golden ``generate_case`` text part),
and its consistency with the full forward, left padding and end tokens."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import assert_close, load_case
from helpers_model import tiny_model

TOL = 1e-4


@pytest.fixture(scope="module")
def case():
    return load_case("generate")


@pytest.fixture(scope="module")
def model():
    return tiny_model(with_image_decoder=False)


def official_lengths(case) -> tuple[int, int]:
    """(max_new_tokens, min_new_tokens) of the recorded call: the official ``max_length`` is a number of new
    tokens and its ``min_length`` counts the placeholder <s> that HF puts first."""
    call = case.meta["text_generation"]["call"]
    max_length = int(re.search(r"max_length=(\d+)", call).group(1))
    min_length = int(re.search(r"min_length=(\d+)", call).group(1))
    return max_length, min_length - 1


def prompt(case) -> tuple[torch.Tensor, torch.Tensor]:
    return case["text.in.text_ids"], case["text.in.image_tensors_uint8"].float() / 255


def words(model, text_ids: torch.Tensor, count: int) -> torch.Tensor:
    """[1, count] copies of the prompt's last ordinary text id (whatever the prompt ends with: text or an image),
    to lengthen a prompt without adding images or special tokens."""
    special = model.config.special_tokens.all_ids
    word = next(int(t) for t in text_ids[0].flip(0) if int(t) not in special)
    return torch.full((1, count), word)


def image_counts(images: torch.Tensor, rows: int) -> list[int]:
    """Every row of a batch built by repeating the prompt holds all the prompt's images."""
    return [images.shape[0]] * rows


@pytest.fixture(scope="module")
def generated(model, case):
    text_ids, images = prompt(case)
    max_new, min_new = official_lengths(case)
    return model.generate_text(text_ids, images, max_new_tokens=max_new, min_new_tokens=min_new)


def test_generate_text_parity_ids(generated, case, model) -> None:
    expected = case["text.out.text_ids"]
    placeholder = torch.full_like(expected[:, :1], model.config.special_tokens.bos_token_id)
    assert torch.equal(torch.cat([placeholder, generated.text_ids], 1), expected)


def test_generate_text_parity_step_logits(generated, case) -> None:
    assert_close(generated.step_logits[0], case["text.out.step_logits"], TOL, "step_logits")


def test_generate_text_kv_cache_matches_full_forward(generated, model, case) -> None:
    """Logits of every cached step = logits of one uncached forward over prompt + generated tokens."""
    text_ids, images = prompt(case)
    full = torch.cat([text_ids, generated.text_ids[:, :-1]], 1)
    with torch.no_grad():
        logits = model(full, images).text_logits
    steps = generated.text_ids.shape[1]
    assert_close(logits[:, text_ids.shape[1] - 1 :], generated.step_logits, TOL, "cached vs full")
    assert logits[:, text_ids.shape[1] - 1 :].shape[1] == steps


def test_generate_text_left_padded_batch(generated, model, case) -> None:
    """A left-padded row generates what it generates alone (positions count real tokens only)."""
    text_ids, images = prompt(case)
    tokens = model.config.special_tokens
    pad = 3
    other = torch.cat([text_ids, words(model, text_ids, pad)], 1)  # same images, longer text
    padded = torch.cat([torch.full((1, pad), tokens.pad_token_id), text_ids], 1)
    mask = torch.ones(2, other.shape[1], dtype=torch.long)
    mask[1, :pad] = 0
    max_new, min_new = official_lengths(case)
    out = model.generate_text(
        torch.cat([other, padded]),
        torch.cat([images, images]),
        image_counts(images, 2),
        mask,
        max_new_tokens=max_new,
        min_new_tokens=min_new,
    )
    assert torch.equal(out.text_ids[1], generated.text_ids[0])
    assert_close(out.step_logits[1], generated.step_logits[0], TOL, "padded row logits")


def test_generate_text_stops_at_end_tokens(generated, model, case) -> None:
    """A row ends at its first end token (allowed only after min_new_tokens); finished rows get pad ids while the
    others go on."""
    text_ids, images = prompt(case)
    ids = generated.text_ids[0]
    steps = ids.shape[0]
    other = torch.cat([text_ids, words(model, text_ids, 2)], 1)
    other_ids = model.generate_text(other, images, max_new_tokens=steps).text_ids[0]
    end = next(k for k in range(1, steps) if int(ids[k]) not in other_ids.tolist())
    end_id = int(ids[end])

    alone = model.generate_text(text_ids, images, max_new_tokens=steps, eos_token_ids=[end_id])
    first = int((ids == end_id).nonzero()[0])
    assert torch.equal(alone.text_ids[0], ids[: first + 1])
    late = model.generate_text(
        text_ids, images, max_new_tokens=first + 1, min_new_tokens=first + 1, eos_token_ids=[end_id]
    )
    assert int(late.text_ids[0, first]) != end_id

    pad_id = model.config.special_tokens.pad_token_id
    padded = torch.cat([torch.full((1, 2), pad_id), text_ids], 1)
    mask = torch.ones(2, other.shape[1], dtype=torch.long)
    mask[0, :2] = 0
    batch = model.generate_text(
        torch.cat([padded, other]),
        torch.cat([images, images]),
        image_counts(images, 2),
        mask,
        max_new_tokens=steps,
        eos_token_ids=[end_id],
    )
    assert torch.equal(batch.text_ids[0, : first + 1], ids[: first + 1])
    assert bool((batch.text_ids[0, first + 1 :] == pad_id).all())
    assert torch.equal(batch.text_ids[1], other_ids)
