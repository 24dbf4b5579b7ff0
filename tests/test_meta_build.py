"""The released 13B model built on the ``meta`` device has exactly the official checkpoint's keys, shapes and
dtypes (reference dump of the official ``state_dict()``); the tiny model has the tiny checkpoint's."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from comfy_mm_interleaved.config import MMInterleavedConfig
from comfy_mm_interleaved.models.mm_interleaved import MMInterleaved
from conftest import golden_dir
from helpers_model import tiny_config
from test_qformer import REFERENCE_KEYS

OWN_PREFIXES = ("mm_decoder.", "text_decoder.", "context_feat_proj.", "soi_token")


def layout(state: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    return {k: (tuple(v.shape), str(v.dtype)) for k, v in state.items()}


@pytest.fixture(scope="module")
def official_13b() -> dict[str, tuple[tuple[int, ...], str]]:
    dump = json.loads(REFERENCE_KEYS.read_text(encoding="utf-8"))  # {key: [shape, dtype]}
    return {k: (tuple(shape), dtype) for k, (shape, dtype) in dump.items()}


def assert_same_layout(ours: dict, official: dict) -> None:
    missing, extra = sorted(set(official) - set(ours)), sorted(set(ours) - set(official))
    assert not missing and not extra, f"missing {missing[:5]} ({len(missing)}), unexpected {extra[:5]} ({len(extra)})"
    wrong = [(k, ours[k], official[k]) for k in official if ours[k] != official[k]]
    assert not wrong, f"{len(wrong)} keys differ in shape/dtype, e.g. {wrong[:3]}"


def test_meta_build_official_13b_matches_official_keys(official_13b) -> None:
    with torch.device("meta"):
        model = MMInterleaved(MMInterleavedConfig.official_13b())
    state = model.state_dict()
    assert all(t.is_meta for t in state.values())
    assert_same_layout(layout(state), official_13b)
    numbers = sum(t.numel() for t in state.values())
    assert numbers == sum(torch.Size(shape).numel() for shape, _ in official_13b.values())


def test_meta_build_llm_parts_match_official_keys(official_13b) -> None:
    """Decoder LLM, text head, context projection and soi token alone; the official trainable split of the LLM
    (the MMFS blocks without their fixed null-slot token)."""
    with torch.device("meta"):
        model = MMInterleaved(MMInterleavedConfig.official_13b(), with_visual_tokenizer=False, with_image_decoder=False)
    assert_same_layout(
        layout(model.state_dict()), {k: v for k, v in official_13b.items() if k.startswith(OWN_PREFIXES)}
    )
    model.mm_decoder.set_official_trainable()
    trainable = sum(p.numel() for p in model.mm_decoder.parameters() if p.requires_grad)
    expected = sum(
        torch.Size(shape).numel()
        for k, (shape, _) in official_13b.items()
        if ".llama_cross_attn." in k and not k.endswith("ignore_token")
    )
    assert trainable == expected


def test_meta_build_tiny_matches_tiny_checkpoint() -> None:
    with safe_open(str(golden_dir() / "tiny_official_state_dict.safetensors"), "pt") as f:
        official = {k: (tuple(f.get_slice(k).get_shape()), None) for k in f.keys()}
        dtypes = {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}
    with torch.device("meta"):
        model = MMInterleaved(tiny_config())
    ours = layout(model.state_dict())
    assert_same_layout({k: (shape, None) for k, (shape, _) in ours.items()}, official)
    to_torch = {"F32": "torch.float32", "I64": "torch.int64"}
    assert {k: ours[k][1] for k in ours} == {k: to_torch[d] for k, d in dtypes.items()}
