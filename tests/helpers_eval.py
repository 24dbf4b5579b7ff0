"""A model folder with the embedded model's architecture and tokenizer, for end-to-end evaluation tests.

``eval_model_dir`` (session fixture) is a freshly initialised (seeded) model of
:func:`comfy_mm_interleaved.shapestories.embedded.embedded_config` saved with its tokenizer, so every ``eval``
task runs end to end through the public CLI (``--model``) without depending on trained weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from comfy_mm_interleaved.checkpoint import save_pretrained
from comfy_mm_interleaved.models.mm_interleaved import MMInterleaved
from comfy_mm_interleaved.shapestories.embedded import build_embedded_tokenizer, embedded_config


def make_eval_model_dir(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = embedded_config()
    save_pretrained(MMInterleaved(config), folder, config=config)
    build_embedded_tokenizer(config).save_pretrained(str(folder / "tokenizer"))
    return folder


@pytest.fixture(scope="session")
def eval_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_eval_model_dir(tmp_path_factory.mktemp("eval-model") / "model")
