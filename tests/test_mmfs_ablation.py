"""MMFS ablation: switched off, the LLM-side gated blocks contribute exactly zero and the UNet gets no MMFS residual;
switched back on, every output is what it was; the engine never reuses LLM states computed with the other setting.

The references are independent of the switch: a copy of the model whose gates are 0 (``tanh(0) = 0``) and whose
MMFSNet output convolutions are 0 (every residual 0) computes what the ablated model must compute, and the UNet run
without any MMFSNet (``mmfs=None``).

``active_model`` is the real tiny ``MMInterleaved`` with a word-level ShapeStories tokenizer; its gates and MMFSNet
output convolutions (zero-initialised in the official model) get non-zero values so that MMFS changes the outputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from comfy_mm_interleaved.config import MMInterleavedConfig
from comfy_mm_interleaved.inference import ImageOptions, Interleaved, InterleavedEngine
from comfy_mm_interleaved.models.ablation import mmfs_ablation, mmfs_switches
from comfy_mm_interleaved.models.llm import GatedMMFSCrossAttention, MMFSInputs, slot_spatial_layout
from comfy_mm_interleaved.models.mm_interleaved import MMInterleaved
from comfy_mm_interleaved.models.unet_mmfs import unet_forward_with_mmfs, unet_skip_channels
from comfy_mm_interleaved.shapestories import WORDS, fixed_split, render
from comfy_mm_interleaved.shapestories.generate import PUNCTUATION
from comfy_mm_interleaved.tokenizer import build_word_tokenizer

TOKENIZER_WORDS = [*WORDS, *PUNCTUATION]
VOCAB_SIZE = len(TOKENIZER_WORDS) + 4  # + <unk>, <s>, </s>, <pad>
IMAGE_OPTIONS = ImageOptions(num_inference_steps=2, guidance_scale=1.0, scheduler="ddim", seed=3)


def tiny_config() -> MMInterleavedConfig:
    return MMInterleavedConfig.tiny(VOCAB_SIZE)


def word_tokenizer(config: MMInterleavedConfig):
    return build_word_tokenizer(TOKENIZER_WORDS, config.special_tokens, config.orig_vocab_size)


def activate_mmfs(model: MMInterleaved, seed: int = 0) -> MMInterleaved:
    """Non-zero LLM gates and MMFSNet output convolutions (both start at zero), so that MMFS does something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for attn in model.mm_decoder.mmfs_layers():
            attn.gate.fill_(1.0)
        for block in model.image_decoder.mmfs_module.blocks:
            for weight in (block.conv.weight, block.conv.bias):
                weight.copy_(0.1 * torch.randn(weight.shape, generator=generator))
    return model


def active_model(seed: int = 0) -> MMInterleaved:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MMInterleaved(tiny_config())
    return activate_mmfs(model, seed).eval()


def zeroed_copy(model: MMInterleaved) -> MMInterleaved:
    """The reference of the ablation: the same weights with every gate and MMFSNet output convolution at zero."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for attn in reference.mm_decoder.mmfs_layers():
            attn.gate.zero_()
        for block in reference.image_decoder.mmfs_module.blocks:
            block.conv.weight.zero_()
            block.conv.bias.zero_()
    return reference


@pytest.fixture(scope="module")
def model() -> MMInterleaved:
    return active_model()


@pytest.fixture(scope="module")
def story() -> Interleaved:
    """A story prompt: the first image and its sentences, the next image to draw (sees the first through MMFS)."""
    document = next(d for d in fixed_split("test", 4) if d.kind == "story")
    first, text = document.segments[:2]
    return Interleaved([render(first, tiny_config().image_decoder.image_size), text.replace(".", " .")])


def engine_of(model: MMInterleaved) -> InterleavedEngine:
    return InterleavedEngine(model, word_tokenizer(model.config))


# ----------------------------------------------------------------------------------------------------------------
def test_gated_block_switched_off_contributes_exact_zero() -> None:
    config = tiny_config()
    torch.manual_seed(0)
    block = GatedMMFSCrossAttention(config, 0).eval()
    with torch.no_grad():
        block.gate.fill_(0.7)
    sizes = config.llm.mmfs.spatial_shapes
    level_shapes = torch.tensor([[s, s] for s in sizes])
    shapes, starts = slot_spatial_layout(level_shapes, 1)
    features = torch.randn(2, 1, sum(s * s for s in sizes), config.image_embed_dim)
    hidden = torch.randn(2, 5, config.llm.hidden_size)
    inputs = MMFSInputs(torch.ones(2, 5, 1), shapes, starts, features=features)
    with torch.no_grad():
        on = block(hidden, inputs)
        assert on.abs().max() > 1e-3, "the gated block must contribute something with a non-zero gate"
        block.mmfs_enabled = False
        off = block(hidden, inputs)
        block.mmfs_enabled = True
        again = block(hidden, inputs)
    assert off.shape == hidden.shape and off.dtype == hidden.dtype
    assert torch.equal(off, torch.zeros_like(hidden))
    assert torch.equal(again, on)


def test_switches_cover_both_sides_and_are_restored(model: MMInterleaved) -> None:
    switches = mmfs_switches(model)
    llm_blocks = list(model.mm_decoder.mmfs_layers())
    assert len(llm_blocks) == len(model.config.llm.mmfs_layer_indices()) >= 1
    assert switches == [*llm_blocks, model.image_decoder.mmfs_module]
    assert all(s.mmfs_enabled for s in switches)
    with pytest.raises(RuntimeError, match="inside"):
        with mmfs_ablation(model):
            assert not any(s.mmfs_enabled for s in switches)
            raise RuntimeError("inside")
    assert all(s.mmfs_enabled for s in switches)
    switches[0].mmfs_enabled = False  # a partial state is restored as it was, also after nesting
    with mmfs_ablation(model), mmfs_ablation(model):
        assert not any(s.mmfs_enabled for s in switches)
    assert [s.mmfs_enabled for s in switches] == [False] + [True] * (len(switches) - 1)
    switches[0].mmfs_enabled = True
    assert "mmfs_enabled" not in str(model.state_dict().keys())
    with pytest.raises(ValueError, match="no MMFS"):
        with mmfs_ablation(nn.Linear(2, 2)):
            pass


def test_unet_ablation_drops_every_residual(model: MMInterleaved) -> None:
    decoder = model.image_decoder
    mmfs, unet = decoder.mmfs_module, decoder.decoder.unet
    g = torch.Generator().manual_seed(1)
    latent = decoder.decoder.latent_shape(decoder.config.image_size, decoder.config.image_size)
    sample = torch.randn(2, *latent, generator=g)
    hidden = torch.randn(2, decoder.config.prompt_length, decoder.neg_prompt_embeds.shape[-1], generator=g)
    features = [torch.randn(2, mmfs.feature_dim, s, s, generator=g) for s in decoder.config.mmfs.spatial_shapes]
    timesteps = torch.tensor([10, 700])
    with torch.no_grad():
        for mask in (torch.tensor([[1], [0]]), torch.zeros(2, 1, dtype=torch.long)):  # source image / null slot
            context = mmfs.prepare(features, mask)
            trace: dict[str, torch.Tensor] = {}
            on = unet_forward_with_mmfs(unet, sample, timesteps, hidden, mmfs, context, trace)
            assert len(trace) == 2 * (len(unet_skip_channels(decoder.config.unet)) + 1)
            assert max(float(r.abs().max()) for k, r in trace.items() if k.endswith("residual")) > 1e-3
            without = unet_forward_with_mmfs(unet, sample, timesteps, hidden)
            with mmfs_ablation(model):
                trace = {}
                off = unet_forward_with_mmfs(unet, sample, timesteps, hidden, mmfs, context, trace)
            assert trace == {}
            assert torch.equal(off, without)
            assert (on - off).abs().max() > 1e-4
            assert torch.equal(unet_forward_with_mmfs(unet, sample, timesteps, hidden, mmfs, context), on)


def test_llm_ablation_equals_zero_gates_and_cache_is_keyed(model: MMInterleaved, story: Interleaved) -> None:
    """On, off, on with ONE engine (whose context cache would hold the whole document each time): the ablated
    logits are those of the zero-gate copy, and switching back gives the first logits again."""
    engine = engine_of(model)
    on = engine.next_token_logits(story)
    with engine.mmfs_ablation():
        off = engine.next_token_logits(story)
    again = engine.next_token_logits(story)
    reference = engine_of(zeroed_copy(model)).next_token_logits(story)
    assert torch.equal(off, reference)
    assert (on - off).abs().max() > 1e-4
    assert torch.equal(again, on)
    assert engine.stats.images_encoded == 1  # image features are shared by both settings


def test_engine_image_ablation_equals_zeroed_model(model: MMInterleaved, story: Interleaved) -> None:
    """A drawn image with MMFS off is bit for bit the image of the zeroed copy (no gate, no UNet residual); MMFS on
    draws a different one, and after the ablation the engine draws the first one again."""
    engine = engine_of(model)
    on = engine.generate_images(story, IMAGE_OPTIONS).tensors
    with engine.mmfs_ablation():
        off = engine.generate_images(story, IMAGE_OPTIONS).tensors
    again = engine.generate_images(story, IMAGE_OPTIONS).tensors
    reference = engine_of(zeroed_copy(model)).generate_images(story, IMAGE_OPTIONS).tensors
    assert torch.equal(off, reference)
    assert (on - off).abs().max() > 1e-4
    assert torch.equal(again, on)
