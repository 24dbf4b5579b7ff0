"""Bridge from the engine's progress callback to ComfyUI: a progress bar step and an interrupt check per event."""

from __future__ import annotations

from typing import Any

import comfy.model_management
import comfy.utils


class ComfyProgress:
    """Pass an instance as the engine's ``progress=`` callback inside a node's ``execute``.

    Every event (one generated token or one diffusion step) first honours ComfyUI's interrupt flag: the
    ``InterruptProcessingException`` raised here unwinds the engine, so an interrupt takes effect within one step.
    Then the running node's bar shows ``step / total`` of the current phase (text tokens or denoising steps).
    """

    def __init__(self) -> None:
        self.bar: comfy.utils.ProgressBar | None = None
        self.events = 0

    def __call__(self, event: Any) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        if self.bar is None:
            self.bar = comfy.utils.ProgressBar(event.total)
        self.bar.update_absolute(event.step, event.total)
        self.events += 1
