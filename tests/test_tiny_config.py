"""``MMInterleavedConfig.tiny``: the real architecture, every part present, small enough for CPU training tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from comfy_mm_interleaved.checkpoint import from_pretrained, save_pretrained
from comfy_mm_interleaved.config import MMInterleavedConfig
from comfy_mm_interleaved.models.mm_interleaved import MMInterleaved
from comfy_mm_interleaved.models.unet_mmfs import unet_skip_channels

VOCAB = 20


@pytest.fixture(scope="module")
def config() -> MMInterleavedConfig:
    return MMInterleavedConfig.tiny(VOCAB)


@pytest.fixture(scope="module")
def model(config) -> MMInterleaved:
    torch.manual_seed(0)
    return MMInterleaved(config)


def story_batch(config: MMInterleavedConfig) -> dict:
    """Row 0: one document with two images (the second image's UNet MMFS reads the first); row 1: image first."""
    tokens, k = config.special_tokens, config.num_img_token
    image = [tokens.boi_token_id] + [tokens.image_token_id] * k
    row0 = [tokens.bos_token_id, 5, 6, *image, 7, 8, *image, 9, tokens.eos_token_id]
    row1 = [tokens.bos_token_id, *image, 5, tokens.eos_token_id]
    row1 += [tokens.pad_token_id] * (len(row0) - len(row1))
    text_ids = torch.tensor([row0, row1])
    gen = torch.Generator().manual_seed(1)
    enc, dec = config.encoder_image_size, config.image_decoder.image_size
    return {
        "text_ids": text_ids,
        "attention_mask": (text_ids != tokens.pad_token_id).long(),
        "image_tensors": torch.rand(3, 3, enc, enc, generator=gen),
        "image_tensors_dec": torch.rand(3, 3, dec, dec, generator=gen),
    }


def test_tiny_config_builds_every_part_at_the_requested_sizes(config, model) -> None:
    vt, llm, dec = config.visual_tokenizer, config.llm, config.image_decoder
    assert (config.orig_vocab_size, config.txt_vocab_size) == (VOCAB, VOCAB + 2)
    tokens = config.special_tokens
    assert (tokens.pad_token_id, tokens.boi_token_id, tokens.image_token_id) == (VOCAB - 1, VOCAB, VOCAB + 1)
    vision = model.visual_tokenizer.encoder.vision_model
    assert len(vision.encoder.layers) == vt.encoder.num_hidden_layers
    groups = vt.encoder.interaction_indexes
    assert len(groups) == 4 and groups[0][0] == 0 and groups[-1][1] == vt.encoder.num_hidden_layers - 1
    assert model.mm_decoder.embed_tokens.weight.shape == (config.txt_vocab_size, llm.hidden_size)
    with_mmfs = [i for i, layer in enumerate(model.mm_decoder.layers) if layer.llama_cross_attn is not None]
    assert with_mmfs == list(range(0, llm.num_hidden_layers, llm.mmfs_every))
    assert len(with_mmfs) < llm.num_hidden_layers  # plain LLaMA layers too
    unet = model.image_decoder.decoder.unet
    assert list(unet.config.block_out_channels) == dec.unet["block_out_channels"]
    assert len(model.image_decoder.mmfs_module.mmfs_down_blocks) == len(unet_skip_channels(dec.unet))

    grid = vt.encoder.image_size // vt.encoder.patch_size
    batch = story_batch(config)
    with torch.no_grad():
        visual = model.visual_tokenizer(batch["image_tensors"])
    assert visual.vis_embed.shape == (3, config.num_img_token, llm.hidden_size)
    sizes = [tuple(m.shape[1:]) for m in visual.multiscale_features]
    assert sizes == [(config.image_embed_dim, s, s) for s in (4 * grid, 2 * grid, grid, grid // 2)]
    assert llm.mmfs.spatial_shapes == [s[1] for s in sizes[1:]]  # the LLM's MMFS reads the last three levels


def test_tiny_model_trains_a_step_through_every_part(config) -> None:
    torch.manual_seed(0)
    model = MMInterleaved(config).train()
    out = model(**story_batch(config))
    assert torch.isfinite(out.loss) and out.loss_img is not None and float(out.loss_img.detach()) > 0
    out.loss.backward()
    # at the official init the adapter, the MMFS attentions and the UNet MMFS blocks sit behind zero gates / zero
    # convolutions: their gates get gradient now, their insides after the first update
    reached = [
        "visual_tokenizer.encoder.vision_model.embeddings.patch_embedding.weight",
        "visual_tokenizer.encoder.vision_model.encoder.layers.0.self_attn.q_proj.weight",
        "visual_tokenizer.perceiver_resampler.blip2qformer.encoder.layer.0.crossattention.attention.key.weight",
        "visual_tokenizer.proj.weight",
        "mm_decoder.layers.1.self_attn.q_proj.weight",
        "mm_decoder.layers.0.llama_cross_attn.gate",
        "text_decoder.head_new.bias",
        "context_feat_proj.weight",
        "image_decoder.perceiver_resampler.queries",
        "image_decoder.decoder.unet.conv_in.weight",
        "image_decoder.decoder.mmfs_module.mmfs_down_blocks.0.conv.weight",
        "soi_token",
    ]
    params = dict(model.named_parameters())
    for name in reached:
        assert params[name].grad is not None and params[name].grad.abs().max() > 0, name
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3).step()
    model.zero_grad()
    model(**story_batch(config)).loss.backward()
    for name in (
        "visual_tokenizer.encoder.vision_model.adapter_interactions.0.injector.attn.value_proj.weight",
        "mm_decoder.layers.0.llama_cross_attn.attn.value_proj.weight",
        "image_decoder.decoder.mmfs_module.mmfs_down_blocks.3.mmfs.value_proj.weight",
    ):
        assert params[name].grad.abs().max() > 0, name


def test_tiny_model_round_trips_through_our_checkpoint_format(config, model, tmp_path: Path) -> None:
    folder = save_pretrained(model, tmp_path / "tiny")
    loaded = from_pretrained(folder)
    assert loaded.config == config
    original = model.state_dict()
    assert set(loaded.state_dict()) == set(original)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, original[key]), key
    model.eval()
    outputs = []
    for m in (model, loaded):
        torch.manual_seed(3)
        outputs.append(m(**story_batch(config)))
    assert torch.equal(outputs[0].text_logits, outputs[1].text_logits)
    assert torch.equal(outputs[0].loss, outputs[1].loss)


def test_tiny_sizes_are_arguments_and_bad_ones_are_explained() -> None:
    big = MMInterleavedConfig.tiny(100, image_size=64, vision_layers=8, llm_layers=4, num_img_token=16)
    assert big.visual_tokenizer.encoder.interaction_indexes == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert big.llm.mmfs.spatial_shapes == [16, 8, 4] and big.visual_tokenizer.resampler.num_queries == 16
    assert big.llm.mmfs_layer_indices() == [0, 2]
    for kwargs, message in (
        ({"vision_layers": 6}, "multiple of 4"),
        ({"image_size": 24}, "even integer"),
        ({"decoder_image_size": 32}, "decoder_image_size"),
        ({"unet_channels": (4, 8, 16)}, "unet_channels"),
        ({"unet_channels": (6, 6, 12, 12)}, r"unet_channels must be 4 widths, each a positive multiple of 4"),
        ({"llm_width": 36}, "llm_width must be a positive multiple of 8, got 36"),  # RoPE: head width 9
        ({"vision_width": 20}, "vision_width must be a positive multiple of 8"),  # adapter values: 10 over 4 heads
        ({"decoder_width": 18}, "decoder_width must be a positive multiple of 4"),
        ({"mmfs_every": 0}, "mmfs_every must be >= 1"),
        ({"num_img_token": 0}, "num_img_token must be >= 1"),
        ({"llm_layers": 0}, "llm_layers must be >= 1"),
        ({"prompt_length": 0}, "prompt_length must be >= 1"),
    ):
        with pytest.raises(ValueError, match=message):
            MMInterleavedConfig.tiny(VOCAB, **kwargs)
    with pytest.raises(ValueError, match="vocab_size"):
        MMInterleavedConfig.tiny(3)
    mismatched = {**MMInterleavedConfig.tiny(VOCAB).to_dict(), "encoder_image_size": 64}  # a hand-edited config.json
    with pytest.raises(ValueError, match=r"encoder_image_size \(64\) must equal visual_tokenizer.encoder.image_size"):
        MMInterleavedConfig.from_dict(mismatched)
    # the smallest accepted sizes build and run a training forward (every check above is necessary, none too strict)
    small = MMInterleavedConfig.tiny(VOCAB, llm_width=8, vision_width=8, decoder_width=4, unet_channels=(4, 4, 4, 4))
    model = MMInterleaved(small).eval()
    tokens = small.special_tokens
    image = [tokens.image_token_id] * small.num_img_token
    ids = torch.tensor([[tokens.bos_token_id, 5, tokens.boi_token_id, *image, 7]])
    size, decoder_size = small.visual_tokenizer.encoder.image_size, small.image_decoder.image_size
    with torch.no_grad():
        out = model(ids, torch.rand(1, 3, size, size), image_tensors_dec=torch.rand(1, 3, decoder_size, decoder_size))
    assert torch.isfinite(out.loss) and out.loss_img is not None
