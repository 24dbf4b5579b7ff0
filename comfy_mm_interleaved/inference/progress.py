"""Progress reporting and cancellation for generation.

Every unit of work calls the user's hook with a :class:`ProgressEvent`: one event per newly encoded image
(phase ``"encode"``), per generated token (``"text"``) and per diffusion step (``"image"``). The hook cancels the
generation by raising (:class:`GenerationCancelled`, or any exception, e.g. ComfyUI's interrupt); the engine then
drops its reusable state that the interruption may have left half-updated, so the next call is still exact.

    flag = CancelFlag()
    engine.generate(doc, progress=flag)       # another thread calls flag.cancel() to stop at the next step
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

log = logging.getLogger(__name__)

PHASES = ("encode", "text", "image")


@dataclass(frozen=True)
class ProgressEvent:
    """``step`` of ``total`` (1-based) of a ``phase``: encode (images), text (tokens) or image (diffusion steps).

    ``total`` of a text phase is the token budget: generation may stop earlier, at an end token. ``preview`` (image
    steps): call it for a rough RGB picture of the image being drawn (the first of a batch); nothing is computed
    unless it is called.
    """

    phase: str
    step: int
    total: int
    preview: Callable[[], Image.Image] | None = field(default=None, compare=False, repr=False)


ProgressCallback = Callable[[ProgressEvent], None]


class GenerationCancelled(RuntimeError):
    """Raised by a progress hook to stop a generation."""


class CancelFlag:
    """A thread-safe progress hook that cancels at the next event once :meth:`cancel` was called; it can also
    forward every event to another hook (e.g. a progress bar)."""

    def __init__(self, forward: ProgressCallback | None = None) -> None:
        self._event = threading.Event()
        self._forward = forward

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def __call__(self, event: ProgressEvent) -> None:
        if self._event.is_set():
            raise GenerationCancelled(f"generation cancelled during {event.phase} step {event.step}/{event.total}")
        if self._forward is not None:
            self._forward(event)


class PreviewThrottle:
    """Which image steps get their preview computed, so previews cost a bounded share of the time whatever one
    costs: a preview at most every ``min_interval_s`` seconds and at least ``cost_factor`` times its own cost apart
    (counted from when the last one finished), plus the last step of an image while previews are cheap. A preview
    that raises is logged once and previews stop; the generation goes on."""

    def __init__(
        self, min_interval_s: float = 0.25, cost_factor: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.min_interval_s = min_interval_s
        self.cost_factor = cost_factor
        self.clock = clock
        self.last = -math.inf  # when the last preview finished
        self.cost = 0.0  # what it took
        self.failed = False

    def wants(self, event: ProgressEvent) -> bool:
        if event.preview is None or self.failed:
            return False
        if event.step == event.total and self.cost <= self.min_interval_s:
            return True
        return self.clock() - self.last >= max(self.min_interval_s, self.cost * self.cost_factor)

    def take(self, event: ProgressEvent) -> Image.Image | None:
        """The event's preview if it is wanted now, else None."""
        if not self.wants(event):
            return None
        started = self.clock()
        try:
            image = event.preview()
        except Exception as err:  # a preview is optional: never lose the image for it
            self.failed = True
            log.warning("previews switched off for this generation: computing one failed (%s)", err)
            return None
        self.last = self.clock()
        self.cost = self.last - started
        return image


def report(
    progress: ProgressCallback | None,
    phase: str,
    step: int,
    total: int,
    preview: Callable[[], Image.Image] | None = None,
) -> None:
    """Call the hook (if any) with one event."""
    if progress is not None:
        progress(ProgressEvent(phase, step, total, preview))
