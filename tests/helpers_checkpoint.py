"""Shared test helper: the golden official-format checkpoint converted once per session into our model folder.

Use it as a fixture from any test module::

    from helpers_checkpoint import converted_tiny_checkpoint  # noqa: F401

    def test_something(converted_tiny_checkpoint):  # noqa: F811
        model = from_pretrained(converted_tiny_checkpoint)

or call ``convert_tiny_checkpoint(tmp_path_factory)`` from a fixture of your own. The conversion runs once per
session (float32, so every tensor equals ``tiny_official_state_dict.safetensors`` bit for bit).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from comfy_mm_interleaved.convert import convert_official
from conftest import golden_dir

OFFICIAL_TINY = "mm_interleaved_pretrain_tiny"
_CONVERTED: dict[Path, Path] = {}


def convert_tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with the golden tiny release converted to float32 (cached per session and golden folder)."""
    golden = golden_dir()
    if golden not in _CONVERTED:
        destination = tmp_path_factory.mktemp("converted_tiny") / "model"
        _CONVERTED[golden] = convert_official(
            golden / OFFICIAL_TINY, destination, dtype="float32", config=golden / "tiny_config.json"
        )
    return _CONVERTED[golden]


@pytest.fixture(scope="session")
def converted_tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_tiny_checkpoint(tmp_path_factory)
