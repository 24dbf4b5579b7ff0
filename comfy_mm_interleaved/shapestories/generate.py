"""Seeded, deterministic generation of ShapeStories documents.

Text rules: words are lower case with one space between them and every sentence ends with ``.`` (a question ends
with ``?`` and its answer with ``.``).

- caption of an image: ``a {size} {colour} {shape} at {row} {column}``; as a sentence with a final ``.``;
- change sentences (each keeps every other attribute, the jitter and the radius, unless the change is about them):
  ``it turns {colour}.`` (a different colour), ``it moves to {row} {column}.`` (a different cell, same jitter),
  ``it becomes a {shape}.`` (a different shape), ``it grows.`` / ``it shrinks.`` (the other size; the radius is
  redrawn uniformly in the new range).

Documents (``<image>`` marks an image):

- caption:    ``<image> a small red circle at top left.``
- generation: ``a small red circle at top left. <image>``
- story:      ``<image> a small red circle at top left. it turns blue. <image> it moves to bottom right. <image>``
  (``min_steps`` to ``max_steps`` changes, 1 to 3 by default; raise ``max_steps`` to test generalisation);
- question:   ``<image> what colour is it? red.`` / ``what shape is it? circle.`` / ``where is it? top left.``

A document is a tuple of segments, each a text string or the :class:`Attributes` of an image; adjacent sentences
share one text segment. Document ``i`` of a stream or split is drawn from its own generator
``numpy.random.default_rng([seed, ...])``, so any document can be reproduced on its own and the splits, each
from its own seed, never share a document: the endless :func:`training_stream` (``TRAIN_SEED``) and the fixed
``"validation"`` (64 per kind) and ``"test"`` (256 per kind) sets of :func:`fixed_split`. :func:`write_split`
stores a split as PNGs plus a JSONL in the project's interleaved form.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .render import check_image_size, render
from .rules import (
    ATTRIBUTES,
    COLOURS,
    COLUMNS,
    MAX_JITTER,
    RADIUS_RANGES,
    ROWS,
    SHAPES,
    SIZES,
    Attributes,
    check_choice,
)

KINDS: tuple[str, ...] = ("caption", "generation", "story", "question")
QUESTIONS: dict[str, str] = {"colour": "what colour is it?", "shape": "what shape is it?", "position": "where is it?"}
QUESTION_TOPICS: tuple[str, ...] = tuple(QUESTIONS)
IMAGE_MARK = "<image>"
PUNCTUATION: tuple[str, ...] = (".", "?")
# Every word a document can contain (punctuation split off): the whole vocabulary of a word-level tokenizer.
WORDS: tuple[str, ...] = tuple(
    sorted(
        {"a", "at", "it", "turns", "moves", "to", "becomes", "grows", "shrinks"}
        | {word for question in QUESTIONS.values() for word in question.rstrip("?").split()}
        | set(SIZES + COLOURS + SHAPES + ROWS + COLUMNS)
    )
)

TRAIN_SEED = 1
SPLIT_SEEDS: dict[str, int] = {"validation": 2, "test": 3}
SPLIT_PER_KIND: dict[str, int] = {"validation": 64, "test": 256}
MIN_STEPS = 1
MAX_STEPS = 3

Segment = str | Attributes


def caption(attributes: Attributes) -> str:
    """``a {size} {colour} {shape} at {row} {column}`` (no final full stop)."""
    a = attributes
    return f"a {a.size} {a.colour} {a.shape} at {a.row} {a.column}"


def caption_sentence(attributes: Attributes) -> str:
    """The caption as a sentence: ``a small red circle at top left.``"""
    return caption(attributes) + "."


@dataclass(frozen=True)
class Change:
    """One story step: ``attribute`` (colour, shape, size or position) takes the label ``value``."""

    attribute: str
    value: str

    def __post_init__(self) -> None:
        check_choice(self.attribute, ATTRIBUTES, "change attribute")
        if self.attribute == "position":
            row, _, column = self.value.partition(" ")
            check_choice(row, ROWS, "row")
            check_choice(column, COLUMNS, "column")
        else:
            choices = {"colour": COLOURS, "shape": SHAPES, "size": SIZES}[self.attribute]
            check_choice(self.value, choices, self.attribute)

    @property
    def sentence(self) -> str:
        if self.attribute == "colour":
            return f"it turns {self.value}."
        if self.attribute == "position":
            return f"it moves to {self.value}."
        if self.attribute == "shape":
            return f"it becomes a {self.value}."
        return "it grows." if self.value == "large" else "it shrinks."

    def to_dict(self) -> dict[str, str]:
        return {"attribute": self.attribute, "value": self.value}


def random_radius(size: str, rng: np.random.Generator) -> float:
    low, high = RADIUS_RANGES[size]
    return float(rng.uniform(low, high))


def random_attributes(rng: np.random.Generator) -> Attributes:
    """Uniform shape, colour, size, cell, radius in the size's range and jitter in [-0.04, 0.04]^2."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = COLOURS[rng.integers(len(COLOURS))]
    size = SIZES[rng.integers(len(SIZES))]
    row = ROWS[rng.integers(len(ROWS))]
    column = COLUMNS[rng.integers(len(COLUMNS))]
    radius = random_radius(size, rng)
    jitter = tuple(float(j) for j in rng.uniform(-MAX_JITTER, MAX_JITTER, size=2))
    return Attributes(shape, colour, size, row, column, radius, jitter)


def _other(choices: Sequence[str], current: str, rng: np.random.Generator) -> str:
    others = [c for c in choices if c != current]
    return others[rng.integers(len(others))]


def random_change(attributes: Attributes, rng: np.random.Generator) -> Change:
    """A uniformly chosen attribute, changed to a uniformly chosen different value (size: the other size)."""
    attribute = ATTRIBUTES[rng.integers(len(ATTRIBUTES))]
    if attribute == "position":
        cells = [f"{row} {column}" for row in ROWS for column in COLUMNS]
        return Change(attribute, _other(cells, attributes.position, rng))
    choices = {"colour": COLOURS, "shape": SHAPES, "size": SIZES}[attribute]
    return Change(attribute, _other(choices, getattr(attributes, attribute), rng))


def apply_change(attributes: Attributes, change: Change, rng: np.random.Generator) -> Attributes:
    """The attributes after ``change``; only a size change draws from ``rng`` (the new radius)."""
    a = attributes
    if change.value == a.labels()[change.attribute]:
        raise ValueError(f"change {change.sentence!r} does not change {a.labels()}")
    if change.attribute == "colour":
        return Attributes(a.shape, change.value, a.size, a.row, a.column, a.radius, a.jitter)
    if change.attribute == "shape":
        return Attributes(change.value, a.colour, a.size, a.row, a.column, a.radius, a.jitter)
    if change.attribute == "position":
        row, column = change.value.split(" ")
        return Attributes(a.shape, a.colour, a.size, row, column, a.radius, a.jitter)
    return Attributes(a.shape, a.colour, change.value, a.row, a.column, random_radius(change.value, rng), a.jitter)


@dataclass(frozen=True)
class Document:
    """One interleaved document: ordered segments (text strings and image attributes) and its story changes."""

    kind: str
    segments: tuple[Segment, ...]
    changes: tuple[Change, ...] = field(default=())

    def __post_init__(self) -> None:
        check_choice(self.kind, KINDS, "document kind")
        for segment in self.segments:
            if not isinstance(segment, (str, Attributes)):
                raise TypeError(f"a segment is a text str or image Attributes, got {type(segment).__name__}")
        if len(self.changes) != (len(self.images) - 1 if self.kind == "story" else 0):
            raise ValueError(
                f"a {self.kind} document with {len(self.images)} images cannot have {len(self.changes)} changes"
            )

    @property
    def images(self) -> tuple[Attributes, ...]:
        return tuple(s for s in self.segments if isinstance(s, Attributes))

    @property
    def text(self) -> str:
        """The whole document as text with ``<image>`` marks, e.g. ``<image> a small red circle at top left.``"""
        return " ".join(IMAGE_MARK if isinstance(s, Attributes) else s for s in self.segments)

    def to_interleaved(self, image_size: int) -> list[dict[str, Any]]:
        """The project's interleaved form: ``[{"image": PIL.Image}, {"text": str}, ...]`` in document order."""
        check_image_size(image_size)
        return [{"image": render(s, image_size)} if isinstance(s, Attributes) else {"text": s} for s in self.segments]


def _append_text(segments: list[Segment], sentence: str) -> None:
    if segments and isinstance(segments[-1], str):
        segments[-1] = f"{segments[-1]} {sentence}"
    else:
        segments.append(sentence)


def _check_steps(min_steps: int, max_steps: int) -> None:
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"story steps need 1 <= min_steps <= max_steps, got min_steps={min_steps}, {max_steps=}")


def make_document(
    kind: str, rng: np.random.Generator, min_steps: int = MIN_STEPS, max_steps: int = MAX_STEPS
) -> Document:
    """One random document of ``kind`` (caption, generation, story or question) drawn from ``rng``."""
    check_choice(kind, KINDS, "document kind")
    _check_steps(min_steps, max_steps)
    first = random_attributes(rng)
    if kind == "caption":
        return Document(kind, (first, caption_sentence(first)))
    if kind == "generation":
        return Document(kind, (caption_sentence(first), first))
    if kind == "question":
        topic = QUESTION_TOPICS[rng.integers(len(QUESTION_TOPICS))]
        return Document(kind, (first, f"{QUESTIONS[topic]} {first.labels()[topic]}."))
    segments: list[Segment] = [first, caption_sentence(first)]
    changes: list[Change] = []
    current = first
    for _ in range(int(rng.integers(min_steps, max_steps + 1))):
        change = random_change(current, rng)
        current = apply_change(current, change, rng)
        changes.append(change)
        _append_text(segments, change.sentence)
        segments.append(current)
    return Document(kind, tuple(segments), tuple(changes))


def _check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    if not kinds:
        raise ValueError(f"kinds must name at least one of {', '.join(KINDS)}")
    return tuple(check_choice(k, KINDS, "document kind") for k in kinds)


def kind_probabilities(kinds: Sequence[str], weights: Sequence[float] | None) -> np.ndarray:
    """Normalised probabilities of ``kinds`` (uniform when ``weights`` is None)."""
    if weights is None:
        return np.full(len(kinds), 1.0 / len(kinds))
    probabilities = np.asarray(weights, dtype=np.float64)
    if probabilities.shape != (len(kinds),) or (probabilities < 0).any() or probabilities.sum() <= 0:
        raise ValueError(f"weights must be {len(kinds)} non-negative numbers (one per kind), got {weights}")
    return probabilities / probabilities.sum()


def stream_document(
    index: int,
    seed: int = TRAIN_SEED,
    kinds: Sequence[str] = KINDS,
    weights: Sequence[float] | None = None,
    min_steps: int = MIN_STEPS,
    max_steps: int = MAX_STEPS,
) -> Document:
    """Document ``index`` of :func:`training_stream` (from ``default_rng([seed, index])``), on its own."""
    kinds = _check_kinds(kinds)
    _check_steps(min_steps, max_steps)
    rng = np.random.default_rng([seed, index])
    kind = kinds[rng.choice(len(kinds), p=kind_probabilities(kinds, weights))]
    return make_document(kind, rng, min_steps, max_steps)


def training_stream(
    seed: int = TRAIN_SEED,
    kinds: Sequence[str] = KINDS,
    weights: Sequence[float] | None = None,
    min_steps: int = MIN_STEPS,
    max_steps: int = MAX_STEPS,
) -> Iterator[Document]:
    """Endless documents; document ``i`` comes from ``default_rng([seed, i])``, its kind drawn by ``weights``."""
    kinds = _check_kinds(kinds)
    _check_steps(min_steps, max_steps)
    kind_probabilities(kinds, weights)  # fail here, not at the first next()
    index = 0
    while True:
        yield stream_document(index, seed, kinds, weights, min_steps, max_steps)
        index += 1


def make_split(
    seed: int,
    per_kind: int,
    kinds: Sequence[str] = KINDS,
    min_steps: int = MIN_STEPS,
    max_steps: int = MAX_STEPS,
) -> list[Document]:
    """``per_kind`` documents of each kind, kind by kind.

    Document ``i`` of kind ``k`` comes from ``default_rng([seed, KINDS.index(k), i])``, so a smaller split is the
    head of each kind's block of a larger one.
    """
    kinds = _check_kinds(kinds)
    if per_kind < 0:
        raise ValueError(f"per_kind must be >= 0, got {per_kind}")
    return [
        make_document(kind, np.random.default_rng([seed, KINDS.index(kind), i]), min_steps, max_steps)
        for kind in kinds
        for i in range(per_kind)
    ]


def fixed_split(name: str, per_kind: int | None = None, max_steps: int = MAX_STEPS) -> list[Document]:
    """The fixed ``"validation"`` or ``"test"`` set, from its own seed (``SPLIT_SEEDS``); ``per_kind`` defaults to
    ``SPLIT_PER_KIND`` (256 documents of each kind for the test set). Raise ``max_steps`` for longer stories."""
    if name not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLIT_SEEDS)}")
    return make_split(SPLIT_SEEDS[name], SPLIT_PER_KIND[name] if per_kind is None else per_kind, max_steps=max_steps)


def write_split(
    folder: str | Path, split: str = "test", image_size: int = 32, documents: Sequence[Document] | None = None
) -> Path:
    """Write ``{folder}/{split}.jsonl`` and the PNGs ``{folder}/{split}/{document:05d}_{image}.png``.

    ``documents`` defaults to the fixed set named ``split`` ("validation" or "test"). Each JSONL line holds ``id``,
    ``kind``, ``text`` (with ``<image>`` marks), ``segments`` (``[{"text": ...}, {"image": PNG path relative to
    folder}]``, the project's interleaved JSONL form), ``images`` (the attributes of each image in order) and
    ``changes`` (story steps). Returns the JSONL path.
    """
    check_image_size(image_size)
    if documents is None:
        if split not in SPLIT_SEEDS:
            raise ValueError(f"unknown split {split!r}; name one of {', '.join(SPLIT_SEEDS)} or pass documents=")
        documents = fixed_split(split)
    folder = Path(folder)
    (folder / split).mkdir(parents=True, exist_ok=True)
    jsonl = folder / f"{split}.jsonl"
    with jsonl.open("w", encoding="utf-8") as out:
        for d, document in enumerate(documents):
            segments: list[dict[str, str]] = []
            images = 0
            for segment in document.segments:
                if isinstance(segment, str):
                    segments.append({"text": segment})
                    continue
                relative = f"{split}/{d:05d}_{images}.png"
                render(segment, image_size).save(folder / relative)
                segments.append({"image": relative})
                images += 1
            record = {
                "id": f"{split}-{d:05d}",
                "kind": document.kind,
                "text": document.text,
                "segments": segments,
                "images": [a.to_dict() for a in document.images],
                "changes": [c.to_dict() for c in document.changes],
            }
            out.write(json.dumps(record) + "\n")
    return jsonl
