"""Documents (the unit every data source produces) and the accounting of skipped bad input."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from ..tokenizer import ImageSegment, Segment, TextSegment

log = logging.getLogger(__name__)


class BadInput(Exception):
    """A record that cannot be used; ``reason`` is a short key for the skip counter (e.g. ``corrupt_image``)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Document:
    """One interleaved document before tokenization: text and image segments in reading order."""

    segments: list[Segment]
    key: str = ""

    @property
    def images(self) -> list[ImageSegment]:
        return [s for s in self.segments if isinstance(s, ImageSegment)]

    def is_empty(self) -> bool:
        return not self.images and not any(isinstance(s, TextSegment) and s.text.strip() for s in self.segments)


@dataclass
class SkipCounter:
    """Counts skipped records by reason; warns for the first ``warn_first`` of each reason, then every 1000th."""

    warn_first: int = 5
    counts: Counter = field(default_factory=Counter)

    def skip(self, err: BadInput, where: str = "") -> None:
        self.counts[err.reason] += 1
        n = self.counts[err.reason]
        if n <= self.warn_first or n % 1000 == 0:
            place = f" in {where}" if where else ""
            log.warning("skipped %s (#%d of this kind)%s: %s", err.reason, n, place, err.detail)

    def take(self) -> dict[str, int]:
        """The counts since the last call (they travel with each batch, also out of DataLoader workers)."""
        out = dict(self.counts)
        self.counts.clear()
        return out
