"""Reading the official configuration (the fixtures' ``tiny_config.json``): every size the official code takes from
it, and the ones it fixes in code, whatever the fixture set. Each test edits a copy of the golden file."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from comfy_mm_interleaved.config import MMInterleavedConfig, QFormerConfig
from comfy_mm_interleaved.models.mm_interleaved import MMInterleaved
from conftest import golden_dir


@pytest.fixture(scope="module")
def official() -> dict:
    return json.loads((golden_dir() / "tiny_config.json").read_text(encoding="utf-8"))


def read(raw: dict, tmp_path: Path) -> MMInterleavedConfig:
    path = tmp_path / "tiny_config.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    return MMInterleavedConfig.from_official_tiny(path)


def test_the_encoder_size_and_table_grid_are_the_official_constants(official, tmp_path: Path) -> None:
    raw = copy.deepcopy(official)
    clip = raw["pretrained_folders"]["clip_vision_config"]
    clip["image_size"] = 112  # clip_vit_adapter_hf overrides it with 224
    clip["patch_size"] = 16  # the patch grid becomes 14, but the VisualTokenizer's sin-cos table stays 16 x 16
    raw["model"]["spatial_shapes"] = [28, 14, 7]  # the pyramid of a 14 x 14 grid: 56, 28, 14, 7
    config = read(raw, tmp_path)
    encoder = config.visual_tokenizer.encoder
    assert (encoder.image_size, encoder.patch_size, encoder.grid_size) == (224, 16, 14)
    assert config.visual_tokenizer.pos_grid_size == 16
    assert config.llm_mmfs_levels == [1, 2, 3]
    model = MMInterleaved(config)
    assert tuple(model.visual_tokenizer.pos_embed.shape) == (1 + 16 * 16, encoder.hidden_size)


def test_the_llm_mmfs_reads_the_pyramid_levels_named_by_spatial_shapes(official, tmp_path: Path) -> None:
    raw = copy.deepcopy(official)
    raw["model"]["spatial_shapes"] = [16, 8]  # the official code keeps the maps whose side is listed
    config = read(raw, tmp_path)
    assert config.llm_mmfs_levels == [2, 3] and config.llm.mmfs.spatial_shapes == [16, 8]
    torch.manual_seed(0)
    model = MMInterleaved(config).eval()
    tokens, k = config.special_tokens, config.num_img_token
    ids = torch.tensor([[tokens.bos_token_id, 5, tokens.boi_token_id, *[tokens.image_token_id] * k, 6, 7]])
    with torch.no_grad():
        out = model(ids, torch.rand(1, 3, 224, 224))
    assert torch.isfinite(out.loss)
    raw["model"]["spatial_shapes"] = [16, 12]
    with pytest.raises(ValueError, match=r"spatial_shapes \[16, 12\] must be sides of the ViT-Adapter pyramid"):
        read(raw, tmp_path)


def test_llm_settings_and_the_official_value_width(official, tmp_path: Path) -> None:
    raw = copy.deepcopy(official)
    llm = raw["pretrained_folders"]["llm_config"]
    llm.update(hidden_size=88, num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0, hidden_act="gelu")
    raw["model"]["image_embed_dim"] = 120
    config = read(raw, tmp_path)
    assert (config.llm.num_key_value_heads, config.llm.rope_theta, config.llm.hidden_act) == (2, 500.0, "gelu")
    # MMFS(d_model=88, ratio=120 / 88) has int(88 * (120 / 88)) = 119 value channels in the official code
    assert config.llm.mmfs.value_dim == int(88 * (120 / 88)) == 119


def test_qformer_settings_are_read_dropped_or_refused() -> None:
    base = {"num_queries": 4, "hidden_size": 16, "encoder_hidden_size": 8, "num_attention_heads": 2}
    config = QFormerConfig.from_official({**base, "layer_norm_eps": 1e-6, "hidden_act": "relu"}, "q")
    assert (config.layer_norm_eps, config.hidden_act) == (1e-6, "relu")
    ignorable = {"vocab_size": 10, "max_position_embeddings": 8, "pad_token_id": 0}
    ignorable["position_embedding_type"] = "absolute"
    assert QFormerConfig.from_official({**base, **ignorable}, "q") == QFormerConfig(**base)
    with pytest.raises(ValueError, match=r"q: unsupported Q-Former settings \['chunk_size_feed_forward'\]"):
        QFormerConfig.from_official({**base, "chunk_size_feed_forward": 2}, "q")
    with pytest.raises(ValueError, match="position_embedding_type 'relative_key' is not supported"):
        QFormerConfig.from_official({**base, "position_embedding_type": "relative_key"}, "q")
