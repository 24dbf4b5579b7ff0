"""Bridge from the engine's progress callback to ComfyUI: a progress bar step and an interrupt check per event, and
a live preview of the image being drawn when ComfyUI shows sampler previews."""

from __future__ import annotations

from typing import Any

import comfy.model_management
import comfy.utils
from comfy.cli_args import LatentPreviewMethod, args

from comfy_mm_interleaved.inference.progress import PreviewThrottle

PREVIEW_INTERVAL_S = 0.25  # at most four previews a second (and the last step's while previews are cheap)
PREVIEW_COST_FACTOR = 10.0  # and at least ten times a preview's own cost apart: at most ~10 % of the time


def previews_enabled() -> bool:
    """Whether ComfyUI runs with sampler previews (``--preview-method`` other than ``none``)."""
    return args.preview_method != LatentPreviewMethod.NoPreviews


class ComfyProgress:
    """Pass an instance as the engine's ``progress=`` callback inside a node's ``execute``.

    Every event (one generated token or one diffusion step) first honours ComfyUI's interrupt flag: the
    ``InterruptProcessingException`` raised here unwinds the engine, so an interrupt takes effect within one step.
    Then the running node's bar shows ``step / total`` of the current phase (text tokens or denoising steps). With
    previews on, diffusion steps also send a picture of the image so far, as ComfyUI's own samplers do (the
    engine's cheap latent-to-RGB map where it is faithful to the model's VAE, else a VAE decode), at most every
    ``PREVIEW_INTERVAL_S`` seconds and never more than a tenth of the time (``PreviewThrottle``); a preview that
    fails only switches previews off.
    """

    def __init__(self) -> None:
        self.bar: comfy.utils.ProgressBar | None = None
        self.events = 0
        self.previews = PreviewThrottle(PREVIEW_INTERVAL_S, PREVIEW_COST_FACTOR)

    def __call__(self, event: Any) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        if self.bar is None:
            self.bar = comfy.utils.ProgressBar(event.total)
        image = self.previews.take(event) if previews_enabled() else None
        # a --preview-size of 0 would make ComfyUI's server fail on an empty image: send the picture as it is then
        preview = None if image is None else ("JPEG", image, args.preview_size if args.preview_size > 0 else None)
        self.bar.update_absolute(event.step, event.total, preview)
        self.events += 1
