"""The engine against the official ``generate`` (golden ``generate_case``), through documents and the public API."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from comfy_mm_interleaved.inference import CachePolicy, ImageOptions, InjectedNoise, TextOptions
from conftest import assert_close, golden_dir, load_case
from test_inference_support import (
    call_float,
    call_int,
    golden_document,
    model_dir,  # noqa: F401
    new_engine,
    special_ids,
    tiny_config,
    uint8_image,
    words,
)

ATOL = 1e-4


@pytest.fixture(scope="module")
def case():
    return load_case("generate")


def text_inputs(case):
    config = tiny_config()
    ids = case["text.in.text_ids"][0].tolist()
    images = [uint8_image(img) for img in case["text.in.image_tensors_uint8"]]
    call = case.meta["text_generation"]["call"]
    # official max_length = new tokens; its min_length counts the placeholder <s> that HF puts first
    options = TextOptions(max_new_tokens=call_int(call, "max_length"), min_new_tokens=call_int(call, "min_length") - 1)
    return golden_document(ids, images, config), options, case["text.out.text_ids"][0, 1:].tolist()


def engine_view(official: list[int]) -> tuple[list[int], bool]:
    """The official greedy ids as the engine returns them: up to the first end token (</s> or <BOI>), which ends
    the text instead of being part of it; and whether that end token was <BOI> (the document then asks for an image)."""
    tokens = tiny_config().special_tokens
    ends = (tokens.eos_token_id, tokens.boi_token_id)
    cut = next((i for i, t in enumerate(official) if t in ends), len(official))
    return official[:cut], cut < len(official) and official[cut] == tokens.boi_token_id


def image_inputs(case):
    config = tiny_config()
    ids = case["image.in.text_ids"][0].tolist()
    images = [uint8_image(img) for img in case["image.in.image_tensors_uint8"]]
    call = case.meta["image_generation"]["call"]
    steps = call_int(call, "num_inference_steps")
    options = ImageOptions(num_inference_steps=steps, guidance_scale=call_float(call, "guidance_scale"))
    return golden_document(ids, images, config), options, steps


@pytest.mark.parametrize("policy", ["cached", "uncached"])
def test_inference_generate_text_parity(model_dir, case, policy) -> None:  # noqa: F811
    doc, options, official = text_inputs(case)
    expected, asks_for_image = engine_view(official)
    engine = new_engine(model_dir, CachePolicy() if policy == "cached" else CachePolicy.none())
    result = engine.generate_text(doc, options)
    assert result.token_ids == expected and result.ends_with_image == asks_for_image
    text = engine.tokenizer.decode(expected, skip_special_tokens=True)
    if not set(expected) & special_ids(tiny_config()):  # the word tokenizer spells id i as "w<i>"
        assert text == words(expected)
    assert result.text == text
    pending = f" <image {doc.num_images + 1}: pending>" if asks_for_image else ""
    assert result.document.to_readable_text() == f"{doc.to_readable_text()} {text}".rstrip() + pending


def test_inference_generate_image_parity_injected_noise(model_dir, case) -> None:  # noqa: F811
    doc, options, steps = image_inputs(case)
    assert doc.ends_with_pending_image  # the fixture's target image
    noise = InjectedNoise(case["image.init_latents"], [case[f"image.step{i}.variance_noise"] for i in range(steps)])
    events = []
    result = new_engine(model_dir).generate_images(doc, options, events.append, noise=noise)
    assert_close(result.tensors, case["image.out.image"], ATOL, "image.out.image")
    assert [e.step for e in events if e.phase == "image"] == list(range(1, steps + 1))
    expected = (case["image.out.image"][0].permute(1, 2, 0) * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    produced = torch.from_numpy(np.array(result.images[0]))
    assert int((produced.int() - expected.int()).abs().max()) <= 1  # 8-bit rounding of values within 1e-4
    assert not result.document.ends_with_pending_image
    assert result.document.num_images == doc.num_images + 1


def test_inference_generate_image_parity_seeded(model_dir, case) -> None:  # noqa: F811
    """The official seed (``sd_base_seed``) reproduces the recorded draws, so the image matches without injection."""
    doc, options, _ = image_inputs(case)
    seed = json.loads((golden_dir() / "tiny_config.json").read_text(encoding="utf-8"))["model"]["image_decoder_config"][
        "sd_base_seed"
    ]
    options.seed = seed
    result = new_engine(model_dir).generate_images(doc, options)
    assert_close(result.tensors, case["image.out.image"], ATOL, "image.out.image (seeded)")
