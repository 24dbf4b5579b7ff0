"""Visual tokenizer (CLIP ViT + ViT-Adapter + Q-Former): golden parity, official key layout, input checks."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from comfy_mm_interleaved.config import MMInterleavedConfig
from comfy_mm_interleaved.models.visual_tokenizer import VisualTokenizer, preprocess_images
from conftest import assert_close, load_case
from test_qformer import official_key_shapes

PREFIX = "visual_tokenizer."


@pytest.fixture(scope="module")
def config(golden: Path) -> MMInterleavedConfig:
    return MMInterleavedConfig.from_official_tiny(golden / "tiny_config.json")


@pytest.fixture(scope="module")
def official_state(golden: Path) -> dict[str, torch.Tensor]:
    state = load_file(str(golden / "tiny_official_state_dict.safetensors"))
    return {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}


@pytest.fixture(scope="module")
def tokenizer(config, official_state) -> VisualTokenizer:
    model = VisualTokenizer(config).eval()
    model.load_state_dict(official_state, strict=True)
    return model


def test_visual_tokenizer_tiny_state_dict_matches_official(config, official_state) -> None:
    ours = VisualTokenizer(config).state_dict()
    assert set(ours) == set(official_state)
    for key, value in official_state.items():
        assert (tuple(ours[key].shape), ours[key].dtype) == (tuple(value.shape), value.dtype), key
    assert ours["encoder.vision_model.embeddings.position_ids"].dtype == torch.int64


def test_visual_tokenizer_parity_fixed_tables_as_constructed(config, official_state) -> None:
    """Tensors the fixture kept from the official construction: sin-cos table, CLIP stats, position ids and the
    deformable sampling-offset biases (zeroed by the official post-init)."""
    ours = VisualTokenizer(config).state_dict()
    kept = ["pos_embed", "clip_mean", "clip_std", "encoder.vision_model.embeddings.position_ids"]
    kept += [k for k in official_state if k.endswith("sampling_offsets.bias")]
    for key in kept:
        assert_close(ours[key], official_state[key], 1e-6, key)


def test_visual_tokenizer_parity_forward_case(tokenizer) -> None:
    case = load_case("forward")
    images = case["in.image_tensors_uint8"].float() / 255
    start = time.perf_counter()
    with torch.no_grad():
        out = tokenizer(images)
    print(
        f"visual tokenizer forward, {images.shape[0]} images {tuple(images.shape[-2:])}: "
        f"{time.perf_counter() - start:.3f} s"
    )
    assert_close(out.last_hidden_state, case["vit.last_hidden_state"], 1e-4, "vit.last_hidden_state")
    n_levels = len(case.keys("vit.multiscale_features."))
    assert len(out.multiscale_features) == n_levels == 4
    for level in range(n_levels):
        name = f"vit.multiscale_features.{level}"
        assert_close(out.multiscale_features[level], case[name], 1e-4, name)
    assert_close(out.vis_embed, case["vt.vis_embed"], 1e-4, "vt.vis_embed")


def test_visual_tokenizer_13b_meta_keys_and_shapes_match_official() -> None:
    with torch.device("meta"):
        model = VisualTokenizer(MMInterleavedConfig.official_13b())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official_key_shapes(PREFIX)


def test_visual_tokenizer_gradient_checkpointing_gives_same_gradients(config, official_state) -> None:
    vt_config = config.visual_tokenizer
    checkpointed = dataclasses.replace(
        config,
        visual_tokenizer=dataclasses.replace(
            vt_config,
            encoder=dataclasses.replace(vt_config.encoder, gradient_checkpointing=True),
            resampler=dataclasses.replace(vt_config.resampler, gradient_checkpointing=True),
        ),
    )
    images = load_case("forward")["in.image_tensors_uint8"][:1].float() / 255
    grads = []
    for cfg in (config, checkpointed):
        model = VisualTokenizer(cfg).train()
        model.load_state_dict(official_state, strict=True)
        torch.manual_seed(0)  # the Q-Former dropout is active in training
        out = model(images)
        loss = out.vis_embed.square().sum() + sum(f.square().mean() for f in out.multiscale_features)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1])
    for name in (
        "encoder.vision_model.adapter_spm.stem.0.weight",
        "encoder.vision_model.encoder.layers.0.mlp.fc1.weight",
        "encoder.vision_model.adapter_interactions.0.injector.gamma",
        "perceiver_resampler.queries",
    ):
        assert_close(grads[1][name], grads[0][name], 1e-5, name)


def test_visual_tokenizer_bad_inputs(tokenizer) -> None:
    size = tokenizer.image_size
    with pytest.raises(TypeError, match="torch.Tensor"):
        tokenizer([[0.0]])
    with pytest.raises(ValueError, match=r"images\[None\]"):
        tokenizer(torch.rand(3, size, size))
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        tokenizer(torch.rand(1, 4, size, size))
    with pytest.raises(TypeError, match="/ 255"):
        tokenizer(torch.zeros(1, 3, size, size, dtype=torch.uint8))
    with pytest.raises(ValueError, match=f"must be {size}x{size}.*preprocess_images"):
        tokenizer(torch.rand(1, 3, size + 32, size))


def test_preprocess_images_center_crops_like_the_official_pipeline() -> None:
    size = 32
    # 2:1 image, left half red / right half blue: no rescale needed, the crop keeps the middle half
    wide = torch.zeros(2 * size, 3, dtype=torch.uint8)
    wide[:size, 0] = 255
    wide[size:, 2] = 255
    pil = Image.fromarray(wide[None].expand(size, -1, -1).numpy())  # [H=size, W=2*size, 3]
    out = preprocess_images(pil, size)
    assert out.shape == (1, 3, size, size) and out.dtype == torch.float32
    half = size // 2
    assert torch.equal(out[0, 0, :, :half], torch.ones(size, half))
    assert torch.equal(out[0, 2, :, half:], torch.ones(size, half))
    assert out[0, 1].abs().max() == 0
    # uint8 tensors of the right size are only scaled; other sizes are resampled (constant image stays constant)
    pixels = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    assert torch.equal(preprocess_images(pixels, size), pixels.float() / 255)
    grey = torch.full((3, 3 * size, 5 * size), 51, dtype=torch.uint8)
    assert_close(preprocess_images(grey, size), torch.full((1, 3, size, size), 0.2), 1e-6, "constant image")
    with pytest.raises(ValueError, match="uint8 tensor"):
        preprocess_images(pixels.float(), size)
    with pytest.raises(TypeError, match="PIL"):
        preprocess_images([], size)
