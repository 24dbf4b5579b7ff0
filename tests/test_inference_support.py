"""Shared helpers of the inference tests (no tests here).

``model_dir``: the golden tiny release converted to our format (``helpers_checkpoint``) plus a word-level tokenizer
saved in ``tokenizer/``, in which the word ``w<i>`` is token id ``i`` for every ordinary id; the engine is always
built through the public ``InterleavedEngine.from_pretrained``. ``golden_document`` turns a fixture prompt back into
an ``Interleaved`` document, so every golden check goes through the document -> token path.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from comfy_mm_interleaved.config import MMInterleavedConfig
from comfy_mm_interleaved.inference import CachePolicy, Interleaved, InterleavedEngine
from comfy_mm_interleaved.tokenizer import build_word_tokenizer
from conftest import golden_dir
from helpers_checkpoint import convert_tiny_checkpoint

_MODEL_DIRS: dict[Path, Path] = {}


def tiny_config() -> MMInterleavedConfig:
    return MMInterleavedConfig.from_official_tiny(golden_dir() / "tiny_config.json")


def special_ids(config: MMInterleavedConfig) -> set[int]:
    tokens = config.special_tokens
    return {0, tokens.bos_token_id, tokens.eos_token_id, tokens.pad_token_id}


def word(token_id: int) -> str:
    return f"w{token_id}"


def words(token_ids) -> str:
    return " ".join(word(int(i)) for i in token_ids)


def ordinary_ids(config: MMInterleavedConfig, count: int, offset: int = 0) -> list[int]:
    """``count`` ordinary (non-special) text ids, skipping the first ``offset`` of them."""
    ids = [i for i in range(config.orig_vocab_size) if i not in special_ids(config)]
    return ids[offset : offset + count]


def make_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder: the converted tiny checkpoint + ``tokenizer/`` (cached per session and golden folder)."""
    golden = golden_dir()
    if golden not in _MODEL_DIRS:
        folder = tmp_path_factory.mktemp("inference_model") / "model"
        shutil.copytree(convert_tiny_checkpoint(tmp_path_factory), folder)
        config = tiny_config()
        vocabulary = [word(i) for i in ordinary_ids(config, config.orig_vocab_size)]
        tokenizer = build_word_tokenizer(vocabulary, config.special_tokens, config.orig_vocab_size)
        tokenizer.save_pretrained(str(folder / "tokenizer"))
        _MODEL_DIRS[golden] = folder
    return _MODEL_DIRS[golden]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory)


def new_engine(model_dir: Path, caching: CachePolicy | None = None) -> InterleavedEngine:
    return InterleavedEngine.from_pretrained(model_dir, device="cpu", caching=caching)


def uint8_image(tensor: torch.Tensor) -> Image.Image:
    """A fixture image [3, H, W] uint8 as a PIL image."""
    return Image.fromarray(tensor.permute(1, 2, 0).contiguous().numpy())


def golden_document(ids: list[int], images: list[Image.Image], config: MMInterleavedConfig) -> Interleaved:
    """The document whose official tokenisation is ``ids`` (``<s>`` first, one image per <BOI>); a trailing
    <BOI> + image tokens with no image left (the generation target) becomes a pending image."""
    tokens = config.special_tokens
    assert ids[0] == tokens.bos_token_id
    items: list = []
    text: list[int] = []
    remaining = list(images)
    for token in ids[1:]:
        if token == tokens.boi_token_id:
            if text:
                items.append(words(text))
                text = []
            items.append(remaining.pop(0) if remaining else None)
        elif token != tokens.image_token_id:
            text.append(token)
    if text:
        items.append(words(text))
    return Interleaved(items)


def call_int(call: str, name: str) -> int:
    return int(re.search(rf"{name}=(\d+)", call).group(1))


def call_float(call: str, name: str) -> float:
    return float(re.search(rf"{name}=([0-9.]+)", call).group(1))


def solid_image(color: tuple[int, int, int], size: tuple[int, int] = (48, 40)) -> Image.Image:
    return Image.new("RGB", size, color)


def noise_image(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())
