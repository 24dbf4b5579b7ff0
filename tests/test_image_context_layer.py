"""``config.image_context_layer``: the image decoder conditioned on an earlier LLM layer's hidden states.

The output of LLM layer k through the final RMSNorm (layers after k do not touch it), validated, saved with the
config, the same in the training forward and in the engine, and exact through the engine's caches.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from comfy_mm_interleaved.config import MMInterleavedConfig
from comfy_mm_interleaved.inference import CachePolicy, ImageOptions, Interleaved, TextOptions
from comfy_mm_interleaved.inference.tokens import document_tokens
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

LAYER = 2


@pytest.fixture(scope="module")
def layer_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """The tiny model folder with ``image_context_layer = LAYER`` in its config."""
    folder = tmp_path_factory.mktemp("context_layer") / "model"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["image_context_layer"] = LAYER
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_bad_layers_are_refused_and_the_field_round_trips() -> None:
    config = tiny_config()
    layers = config.llm.num_hidden_layers
    for bad in (0, layers, -1):
        config.image_context_layer = bad
        with pytest.raises(ValueError, match=rf"image_context_layer must be None .* or 1\.\.{layers - 1}"):
            MMInterleaved(config, with_visual_tokenizer=False, with_image_decoder=False)
    config.image_context_layer = LAYER
    assert MMInterleavedConfig.from_dict(config.to_dict()).image_context_layer == LAYER
    old = config.to_dict()
    del old["image_context_layer"]  # a config.json written before the field existed
    assert MMInterleavedConfig.from_dict(old).image_context_layer is None


def test_context_is_the_normed_output_of_that_layer() -> None:
    torch.manual_seed(0)
    config = tiny_config()
    config.image_context_layer = LAYER
    model = MMInterleaved(config, with_visual_tokenizer=False, with_image_decoder=False).eval()
    text_ids = torch.tensor([ordinary_ids(config, 7, 3), ordinary_ids(config, 7, 30)])
    embeds = model.embed(text_ids, None)
    mmfs = model.llm_mmfs_inputs(model._layout(text_ids, None), None, text_ids.shape)  # no image: one empty slot
    layers = model.mm_decoder.layers
    with torch.no_grad():
        hidden, context = model.run_llm(inputs_embeds=embeds, mmfs=mmfs)
        expected = embeds
        positions = torch.arange(7)[None].expand(2, -1)
        rotary = model.mm_decoder.rotary_emb(embeds, positions)
        causal = torch.full((7, 7), float("-inf")).triu(1)[None, None]
        for layer in layers[:LAYER]:  # the first LAYER layers, by hand
            expected = layer(expected, causal, positions, position_embeddings=rotary, mmfs=mmfs)
        assert_close(context, model.mm_decoder.norm(expected), 1e-5, "context = norm(output of layer LAYER)")
        assert (hidden - context).abs().max() > 1e-2  # the final hidden states are another tensor
        for layer in layers[LAYER:]:  # later layers cannot change the context
            torch.nn.init.normal_(layer.mlp.down_proj.weight)
        new_hidden, new_context = model.run_llm(inputs_embeds=embeds, mmfs=mmfs)
        assert torch.equal(new_context, context)
        assert not torch.allclose(new_hidden, hidden)
        config.image_context_layer = None
        hidden, context = model.run_llm(inputs_embeds=embeds, mmfs=mmfs)
    assert context is hidden  # the official conditioning: the final hidden states


def prompt(config: MMInterleavedConfig) -> Interleaved:
    return Interleaved([words(ordinary_ids(config, 5, 20)), noise_image(4), words(ordinary_ids(config, 3, 60))])


def resampler_inputs(model: MMInterleaved, run) -> list[torch.Tensor]:  # noqa: ANN001
    """The context features the image decoder's Q-Former receives while ``run()`` executes."""
    seen: list[torch.Tensor] = []
    resampler = model.image_decoder.perceiver_resampler
    handle = resampler.register_forward_hook(lambda _m, args, _o: seen.append(args[0].detach().clone()))
    try:
        run()
    finally:
        handle.remove()
    return seen


def test_engine_conditions_the_decoder_as_the_training_forward_does(layer_dir: Path) -> None:
    engine = new_engine(layer_dir)
    config, tokens = engine.config, engine.config.special_tokens
    doc = prompt(config)
    ids = document_tokens(doc, engine.tokenizer, config).ids + [tokens.boi_token_id]
    text_ids = torch.tensor([ids + [tokens.image_token_id] * config.num_img_token + [tokens.eos_token_id]])
    size, dec = config.encoder_image_size, config.image_decoder.image_size
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, size, size, generator=generator)  # the prompt's image, then the drawn one
    engine.model.eval()
    with torch.no_grad():
        train_in = resampler_inputs(
            engine.model,
            lambda: engine.model(
                text_ids=text_ids,
                image_tensors=images,
                image_tensors_dec=torch.rand(2, 3, dec, dec, generator=generator),
                num_image_per_seq=torch.tensor([2]),
            ),
        )[-1]  # the drawn image's conditioning (images in document order)
    infer_in = resampler_inputs(engine.model, lambda: engine.generate_images(doc, ImageOptions(num_inference_steps=1)))
    rows = len(ids)  # <s> .. <BOI>, reversed
    assert infer_in[0].shape[1] == rows
    # the prompt image enters the LLM through the engine's own preprocessing, so compare only the text-side rows
    # that precede the image: they depend on the text alone
    before_image = ids.index(tokens.boi_token_id)
    assert_close(infer_in[0][0, rows - before_image :], train_in[-1, rows - before_image : rows], 1e-5, "context rows")


def test_caches_stay_exact_with_a_context_layer(layer_dir: Path) -> None:
    cached, reference = new_engine(layer_dir), new_engine(layer_dir, CachePolicy.none())
    doc = prompt(cached.config)
    options = TextOptions(max_new_tokens=4, min_new_tokens=4)
    extended = cached.generate_text(doc, options).document  # the cache now holds the generated tokens' rows
    length = len(document_tokens(extended, cached.tokenizer, cached.config).ids)
    assert length == len(document_tokens(doc, cached.tokenizer, cached.config).ids) + 4
    image = ImageOptions(num_inference_steps=2, seed=5)
    reused = cached.stats.reused_tokens
    ours, theirs = cached.generate_images(extended, image), reference.generate_images(extended, image)
    # every row came from the cache, the generated ones included, but the last token (sampled, never fed back)
    assert cached.stats.reused_tokens - reused == length - 1
    assert_close(ours.tensors, theirs.tensors, 1e-4, "image after a cached extension, cached vs uncached")
