"""The model the end-to-end evaluation tests run on: the shipped embedded model (``comfy_mm_interleaved/embedded``),
so every ``eval`` task runs through the public CLI (``--model``) on the default model users get."""

from __future__ import annotations

from pathlib import Path

import pytest

from comfy_mm_interleaved.inference.engine import EMBEDDED_MODEL_DIR


@pytest.fixture(scope="session")
def eval_model_dir() -> Path:
    return EMBEDDED_MODEL_DIR
