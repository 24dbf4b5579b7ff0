"""Progress reporting and cancellation for generation.

Every unit of work calls the user's hook with a :class:`ProgressEvent`: one event per newly encoded image
(phase ``"encode"``), per generated token (``"text"``) and per diffusion step (``"image"``). The hook cancels the
generation by raising (:class:`GenerationCancelled`, or any exception, e.g. ComfyUI's interrupt); the engine then
drops its reusable state that the interruption may have left half-updated, so the next call is still exact.

    flag = CancelFlag()
    engine.generate(doc, progress=flag)       # another thread calls flag.cancel() to stop at the next step
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

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
    """Which image steps get their (costly) preview computed: at most one every ``min_interval_s`` seconds, and
    always the last step of an image, so a preview shows at a human pace whatever a step costs."""

    def __init__(self, min_interval_s: float = 0.25, clock: Callable[[], float] = time.monotonic) -> None:
        self.min_interval_s = min_interval_s
        self.clock = clock
        self.last = -math.inf

    def wants(self, event: ProgressEvent) -> bool:
        if event.preview is None:
            return False
        now = self.clock()
        if event.step == event.total or now - self.last >= self.min_interval_s:
            self.last = now
            return True
        return False


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
