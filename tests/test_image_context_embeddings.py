"""``config.image_context_embeddings``: the image decoder's context also gets the LLM's gated input embeddings.

The gate starts at zero, so a model folder extended with it computes exactly what it did before; with a non-zero
gate the context is the layer's states plus ``gate * norm(embeddings)``, saved and loaded with the model, and exact
through the engine's caches.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from comfy_mm_interleaved.checkpoint import save_pretrained
from comfy_mm_interleaved.config import MMInterleavedConfig
from comfy_mm_interleaved.inference import CachePolicy, ImageOptions, Interleaved, TextOptions
from comfy_mm_interleaved.inference.engine import InterleavedEngine
from comfy_mm_interleaved.models.mm_interleaved import MMInterleaved
from conftest import assert_close
from test_inference_support import (
    model_dir,  # noqa: F401
    new_engine,
    noise_image,
    ordinary_ids,
    tiny_config,
    words,
)


def test_zero_gate_keeps_the_context_and_a_gate_adds_the_normed_embeddings() -> None:
    torch.manual_seed(0)
    config = tiny_config()
    config.image_context_layer = 2
    plain = MMInterleaved(config, with_visual_tokenizer=False, with_image_decoder=False).eval()
    gated_config = MMInterleavedConfig.from_dict({**config.to_dict(), "image_context_embeddings": True})
    assert MMInterleavedConfig.from_dict(gated_config.to_dict()).image_context_embeddings
    gated = MMInterleaved(gated_config, with_visual_tokenizer=False, with_image_decoder=False).eval()
    missing, unexpected = gated.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["context_embed_gate"] and unexpected == []
    assert plain.separate_image_context and gated.separate_image_context
    text_ids = torch.tensor([ordinary_ids(config, 6, 3)])
    embeds = plain.embed(text_ids, None)
    mmfs = plain.llm_mmfs_inputs(plain._layout(text_ids, None), None, text_ids.shape)
    with torch.no_grad():
        hidden, context = plain.run_llm(inputs_embeds=embeds, mmfs=mmfs)
        same_hidden, same_context = gated.run_llm(inputs_embeds=embeds, mmfs=mmfs)
        assert torch.equal(same_hidden, hidden) and torch.equal(same_context, context)
        gated.context_embed_gate.normal_()
        new_hidden, new_context = gated.run_llm(inputs_embeds=embeds, mmfs=mmfs)
    assert torch.equal(new_hidden, hidden)  # the text side is untouched
    expected = context + gated.context_embed_gate * gated.mm_decoder.norm(embeds)
    assert_close(new_context, expected, 1e-6, "context + gate * norm(embeddings)")
    config.image_context_layer = None  # final states as the context: now a separate tensor
    assert not plain.separate_image_context
    gated.config.image_context_layer = None
    with torch.no_grad():
        final, final_context = gated.run_llm(inputs_embeds=embeds, mmfs=mmfs)
    assert gated.separate_image_context and not torch.allclose(final, final_context)


@pytest.fixture(scope="module")
def gated_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """The tiny model folder re-saved with ``image_context_embeddings`` and a random gate."""
    source = InterleavedEngine.from_pretrained(model_dir, device="cpu").model
    config = MMInterleavedConfig.from_dict({**source.config.to_dict(), "image_context_embeddings": True})
    model = MMInterleaved(config)
    model.load_state_dict(source.state_dict(), strict=False)
    with torch.no_grad():
        model.context_embed_gate.copy_(torch.randn(config.llm.hidden_size, generator=torch.Generator().manual_seed(3)))
    folder = tmp_path_factory.mktemp("context_embeddings") / "model"
    save_pretrained(model, folder)
    shutil.copytree(model_dir / "tokenizer", folder / "tokenizer")
    return folder


def test_the_gate_is_saved_and_the_caches_stay_exact(gated_dir: Path) -> None:
    cached, reference = new_engine(gated_dir), new_engine(gated_dir, CachePolicy.none())
    assert cached.model.context_embed_gate.abs().sum() > 0
    config = cached.config
    doc = Interleaved([words(ordinary_ids(config, 5, 20)), noise_image(4), words(ordinary_ids(config, 3, 60))])
    extended = cached.generate_text(doc, TextOptions(max_new_tokens=4, min_new_tokens=4)).document
    image = ImageOptions(num_inference_steps=2, seed=5)
    ours, theirs = cached.generate_images(extended, image), reference.generate_images(extended, image)
    assert_close(ours.tensors, theirs.tensors, 1e-4, "image after a cached extension, cached vs uncached")
