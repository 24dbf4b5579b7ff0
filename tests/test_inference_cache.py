"""The engine's caches are exact and do what they claim: cached = uncached (tokens, images, logits), extending a
document runs only the new tokens, images are encoded once, MMFS values projected once per image and layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from comfy_mm_interleaved.inference import (
    CachePolicy,
    CancelFlag,
    GenerationCancelled,
    ImageOptions,
    Interleaved,
    TextOptions,
)
from conftest import assert_close
from test_inference_support import (
    model_dir,  # noqa: F401
    new_engine,
    noise_image,
    ordinary_ids,
    tiny_config,
    words,
)

ATOL = 1e-4


@pytest.fixture(scope="module")
def config():
    return tiny_config()


@pytest.fixture(scope="module")
def story(config) -> Interleaved:
    return Interleaved(
        [
            words(ordinary_ids(config, 4, 10)),
            noise_image(1),
            words(ordinary_ids(config, 3, 40)),
            noise_image(2, (80, 48)),
            words(ordinary_ids(config, 2, 70)),
        ]
    )


@pytest.fixture(scope="module")
def cached(model_dir):  # noqa: F811
    return new_engine(model_dir)


@pytest.fixture(scope="module")
def reference(model_dir):  # noqa: F811
    return new_engine(model_dir, CachePolicy.none())


def prompt_length(engine, doc: Interleaved) -> int:
    return engine.document_length(doc)


def test_cached_and_uncached_greedy_tokens_identical(cached, reference, story) -> None:
    options = TextOptions(max_new_tokens=10, min_new_tokens=10)
    assert cached.generate_text(story, options).token_ids == reference.generate_text(story, options).token_ids
    beams = TextOptions(max_new_tokens=4, num_beams=2)
    assert cached.generate_text(story, beams).token_ids == reference.generate_text(story, beams).token_ids


def test_cached_and_uncached_images_identical(cached, reference, story) -> None:
    options = ImageOptions(num_inference_steps=2, seed=3)
    ours, theirs = cached.generate_images(story, options), reference.generate_images(story, options)
    assert_close(ours.tensors, theirs.tensors, ATOL, "seeded image, cached vs uncached")
    assert ours.document.num_images == story.num_images + 1


def test_extension_runs_only_new_tokens_and_equals_full_recompute(model_dir, reference, story, config) -> None:  # noqa: F811
    engine = new_engine(model_dir)
    first = engine.generate_text(story, TextOptions(max_new_tokens=6, min_new_tokens=6))
    start = prompt_length(engine, story)
    assert engine.stats.llm_tokens == start + 5  # the prompt, then every generated token but the last
    assert engine.stats.reused_tokens == 0

    extended = first.document.append_image(noise_image(3)).append_text(words(ordinary_ids(config, 3, 90)))
    ran, reused = engine.stats.llm_tokens, engine.stats.reused_tokens
    logits = engine.next_token_logits(extended)
    assert engine.stats.reused_tokens - reused == start + 5
    assert engine.stats.llm_tokens - ran == prompt_length(engine, extended) - (start + 5)
    assert_close(logits, reference.next_token_logits(extended), ATOL, "extended document logits")

    options = ImageOptions(num_inference_steps=2, seed=5)
    drawn = engine.generate_images(extended, options)
    assert_close(drawn.tensors, reference.generate_images(extended, options).tensors, ATOL, "image after extension")
    assert engine.stats.llm_tokens - ran == prompt_length(engine, extended) - (start + 5) + 1  # + its <BOI>

    after = drawn.document.append_text(words(ordinary_ids(config, 2, 120)))
    ran = engine.stats.llm_tokens
    assert_close(engine.next_token_logits(after), reference.next_token_logits(after), ATOL, "after the new image")
    # the <BOI> of the drawn image was already run: only its image tokens and the new text are
    assert engine.stats.llm_tokens - ran == config.num_img_token + 2
    # every distinct image was encoded once: two of the story, the appended one, the drawn one
    assert engine.stats.images_encoded == 4


def test_changed_image_recomputes_from_its_first_image_token(model_dir, reference, config) -> None:  # noqa: F811
    engine = new_engine(model_dir)
    text = words(ordinary_ids(config, 3, 10))
    engine.next_token_logits(Interleaved([text, noise_image(7), "w5"]))
    other = Interleaved([text, noise_image(8), "w5"])
    reused = engine.stats.reused_tokens
    logits = engine.next_token_logits(other)
    assert engine.stats.reused_tokens - reused == 1 + 3 + 1  # <s>, the text and the <BOI>
    assert_close(logits, reference.next_token_logits(other), ATOL, "changed image")


def test_beam_search_leaves_the_context_reusable(model_dir, reference, story) -> None:  # noqa: F811
    engine = new_engine(model_dir)
    result = engine.generate_text(story, TextOptions(max_new_tokens=4, num_beams=3))
    assert_close(
        engine.next_token_logits(result.document),
        reference.next_token_logits(result.document),
        ATOL,
        "after beam search",
    )
    assert engine.stats.reused_tokens == prompt_length(engine, story)


def test_images_are_encoded_once_by_content(model_dir, config) -> None:  # noqa: F811
    engine = new_engine(model_dir)
    image = noise_image(11)
    doc = Interleaved([image, "w5 w6", image])
    engine.next_token_logits(doc)
    assert engine.stats.images_encoded == 1
    as_tensor = torch.from_numpy(np.array(image)).float() / 255  # a ComfyUI IMAGE of the same pixels
    (encoded,) = engine.encode_images(as_tensor[None])
    assert engine.stats.images_encoded == 1 and encoded.key == doc.image_parts[0].key
    engine.generate_text(doc, TextOptions(max_new_tokens=2))
    assert engine.stats.images_encoded == 1
    uncached = new_engine(model_dir, CachePolicy.official())
    uncached.next_token_logits(doc)
    uncached.next_token_logits(doc)
    assert uncached.stats.images_encoded == 2  # official: every call encodes (duplicates within a call once)


def count_value_projections(engine) -> list[int]:
    counts = [0]

    def hook(module, args, output):
        counts[0] += 1

    for attn in engine.model.mm_decoder.mmfs_layers():
        attn.attn.value_proj.register_forward_hook(hook)
    return counts


def test_mmfs_values_are_projected_once_per_image_and_layer(model_dir, story) -> None:  # noqa: F811
    layers = len(list(new_engine(model_dir).model.mm_decoder.mmfs_layers()))
    engine = new_engine(model_dir)
    counts = count_value_projections(engine)
    result = engine.generate_text(story, TextOptions(max_new_tokens=6, min_new_tokens=6))
    assert counts[0] == layers * story.num_images
    engine.generate_text(result.document, TextOptions(max_new_tokens=3))
    assert counts[0] == layers * story.num_images  # the next call reuses them

    official = new_engine(model_dir, CachePolicy.official())
    counts = count_value_projections(official)
    official.generate_text(story, TextOptions(max_new_tokens=6, min_new_tokens=6))
    assert counts[0] == layers * 6  # every forward (prompt + 5 fed tokens) projects every image again


def test_interrupted_generation_leaves_exact_state(model_dir, reference, story) -> None:  # noqa: F811
    engine = new_engine(model_dir)
    flag = CancelFlag()
    events = []

    def hook(event) -> None:
        events.append(event)
        if event.phase == "text" and event.step == 3:
            flag.cancel()
        flag(event)

    options = TextOptions(max_new_tokens=8, min_new_tokens=8)
    with pytest.raises(GenerationCancelled):
        engine.generate_text(story, options, hook)
    assert [e.step for e in events if e.phase == "text"] == [1, 2, 3]
    assert engine.generate_text(story, options).token_ids == reference.generate_text(story, options).token_ids
