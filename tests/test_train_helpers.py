"""What the training tests share: the real MMInterleaved at its tiny configuration, a word tokenizer and
ShapeStories corpora written as the project's interleaved JSONL.

Runs build the model with ``model.factory: test_train_helpers:build`` (subprocesses get ``tests/`` on
``PYTHONPATH``); the environment variables ``TRAIN_TEST_KILL_AT_CALL`` / ``TRAIN_TEST_TERM_AT_CALL`` make the
process send itself SIGKILL / SIGTERM at that training forward call (a forward pre-hook on the real model: fault
injection, no change to the model).
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from comfy_mm_interleaved.config import MMInterleavedConfig
from comfy_mm_interleaved.models.mm_interleaved import MMInterleaved
from comfy_mm_interleaved.shapestories import WORDS as SHAPE_WORDS
from comfy_mm_interleaved.shapestories import Attributes, Document, make_split, render
from comfy_mm_interleaved.shapestories.generate import PUNCTUATION

WORDS = [*SHAPE_WORDS, *PUNCTUATION, "big", "then", "the", "end"]  # the last four: data-pipeline tests
VOCAB_SIZE = len(WORDS) + 4  # + <unk>, <s>, </s>, <pad>
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 40), "blue": (50, 60, 235), "yellow": (230, 220, 40)}
IMAGE_SIZE = 64  # rendered images: the decoder size; the stream resizes them for the encoder


def tiny_config(**sizes) -> MMInterleavedConfig:
    return MMInterleavedConfig.tiny(VOCAB_SIZE, **sizes)


class FaultInjector:
    """Forward pre-hook: the process sends itself ``sig`` at the ``at``-th training forward call."""

    def __init__(self, at: int, sig: signal.Signals, group: bool = False) -> None:
        self.at, self.sig, self.group, self.calls = at, sig, group, 0

    def __call__(self, module: torch.nn.Module, args: tuple) -> None:
        if module.training:
            self.calls += 1
            if self.calls == self.at:
                if self.group:  # the whole process group, DataLoader workers included (timeout, kill -TERM -pgid)
                    os.killpg(os.getpgrp(), self.sig)
                else:
                    os.kill(os.getpid(), self.sig)


def build(cfg=None) -> MMInterleaved:  # noqa: ANN001
    """The real tiny MMInterleaved with fixed initial weights (whatever the global RNG state)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MMInterleaved(tiny_config())
    faults = (
        ("TRAIN_TEST_KILL_AT_CALL", signal.SIGKILL, False),
        ("TRAIN_TEST_TERM_AT_CALL", signal.SIGTERM, False),
        ("TRAIN_TEST_TERM_GROUP_AT_CALL", signal.SIGTERM, True),
    )
    for env, sig, group in faults:
        if os.environ.get(env):
            model.register_forward_pre_hook(FaultInjector(int(os.environ[env]), sig, group))
    return model


# ---------------------------------------------------------------------------------------------------------------
# Data


def spaced(text: str) -> str:
    """ShapeStories text for a whitespace word tokenizer: ``it turns blue.`` -> ``it turns blue .``"""
    return re.sub(r"\s*([.?])", r" \1", text).strip()


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def write_documents(folder: Path, name: str, documents: Sequence[Document], sft: bool = False) -> Path:
    """``folder/name.jsonl`` in the interleaved format, images as PNGs under ``folder/name/``. With ``sft`` the
    question of a question document is prompt text (``loss: false``) and only its answer is a text target."""
    (folder / name).mkdir(parents=True, exist_ok=True)
    records = []
    for d, document in enumerate(documents):
        segments: list[dict] = []
        for k, segment in enumerate(document.segments):
            if isinstance(segment, Attributes):
                relative = f"{name}/{d:04d}_{k}.png"
                render(segment, IMAGE_SIZE).save(folder / relative)
                segments.append({"image": relative})
            elif sft:
                question, answer = segment.split("? ")
                segments += [{"text": spaced(question + "?"), "loss": False}, {"text": spaced(answer)}]
            else:
                segments.append({"text": spaced(segment)})
        records.append({"id": f"{name}-{d}", "segments": segments})
    return write_jsonl(folder / f"{name}.jsonl", records)


def story_corpus(folder: Path, n_docs: int = 16, seed: int = 11) -> Path:
    """ShapeStories stories with one or two change steps (2-3 images each)."""
    return write_documents(folder, "stories", make_split(seed, n_docs, kinds=("story",), max_steps=2))


def make_image(path: Path, colour: str, size: int = 40, seed: int = 0) -> str:
    """A noisy single-colour image (data-pipeline tests)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.tensor(COLOURS[colour], dtype=torch.float32)[None, None, :]
    noise = torch.randint(-20, 21, (size, size, 3), generator=gen).float()
    Image.fromarray((base + noise).clamp(0, 255).to(torch.uint8).numpy()).save(path)
    return path.name


def interleaved_corpus(folder: Path, n_docs: int = 24) -> Path:
    """Small interleaved documents 'a red square . <img> it turns blue . <img> a small circle .' (data tests)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    records = []
    for i in range(n_docs):
        c1, c2 = names[i % 4], names[(i + 1 + i // 4) % 4]
        im1 = make_image(folder / f"d{i}a.png", c1, seed=i)
        im2 = make_image(folder / f"d{i}b.png", c2, seed=100 + i)
        shape = ["square", "circle"][i % 2]
        records.append(
            {"segments": [f"a {c1} {shape} .", {"image": im1}, f"it turns {c2} .", {"image": im2}, "a small circle ."]}
        )
    return write_jsonl(folder / "docs.jsonl", records)
