"""Options of text and image generation (defaults: the official demo, ``mm_inference.yaml``, where it sets them).

Official demo settings for reference: nucleus sampling (``do_sample=True, top_p=0.9``), 90 new tokens, at least 8
(``min_new_tokens=7``: the official ``min_length`` counts a placeholder ``<s>``), repetition penalty 1.3; images with
30 DDPM steps, guidance 7.5, seed 42. The paper's text-to-image evaluation uses 250 DDPM steps and guidance 3.5.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class TextOptions:
    """Text decoding. Greedy by default; ``do_sample`` = temperature / top-k / top-p sampling from a generator seeded
    with ``seed``; ``num_beams > 1`` = beam search (HF semantics, ``length_penalty`` on the hypothesis length).

    ``repetition_penalty`` follows HF: logits of tokens already generated in this call are divided by it when
    positive and multiplied when negative (the official call passes embeddings, so HF's penalty only sees generated
    ids). Generation stops at ``</s>`` (end of document) and, with ``stop_on_image``, at ``<|beginofimage|>``
    (then the document asks for an image); without it, ``<|beginofimage|>`` is never generated. End tokens are
    forbidden for the first ``min_new_tokens`` tokens. ``<s>`` and ``<|image|>`` are never generated (they would
    break the document layout).
    """

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_beams: int = 1
    seed: int = 0
    stop_on_image: bool = True
    length_penalty: float = 1.0

    def validate(self) -> None:
        _require(
            isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
            f"max_new_tokens must be >= 1, got {self.max_new_tokens}",
        )
        _require(
            isinstance(self.min_new_tokens, int) and 0 <= self.min_new_tokens,
            f"min_new_tokens must be >= 0, got {self.min_new_tokens}",
        )
        _require(
            self.min_new_tokens <= self.max_new_tokens,
            f"min_new_tokens ({self.min_new_tokens}) is larger than max_new_tokens ({self.max_new_tokens}): "
            "lower min_new_tokens or raise max_new_tokens",
        )
        _require(
            math.isfinite(self.temperature) and self.temperature > 0, f"temperature must be > 0, got {self.temperature}"
        )
        _require(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}")
        _require(0 < self.top_p <= 1, f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        _require(
            math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
            f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}",
        )
        _require(
            isinstance(self.num_beams, int) and self.num_beams >= 1, f"num_beams must be >= 1, got {self.num_beams}"
        )
        _require(
            not (self.do_sample and self.num_beams > 1),
            "beam search with sampling is not supported: use num_beams=1 with do_sample, or do_sample=False",
        )
        _require(isinstance(self.seed, int), f"seed must be an int, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ImageOptions:
    """Image generation: ``scheduler`` one of ``ddpm`` (official), ``ddim``, ``euler``, ``euler_ancestral``,
    ``dpmpp_2m`` (DPM-Solver++); classifier-free guidance with the learned negative embeddings when
    ``guidance_scale > 1``. Image k of a call uses a generator seeded with ``seed + k`` (official). ``height`` /
    ``width`` default to (and must equal) the model's decoder image size."""

    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    scheduler: str = "ddpm"
    seed: int = 42
    num_images: int = 1
    height: int | None = None
    width: int | None = None

    def validate(self, image_size: int) -> None:
        from ..models.diffusion import SCHEDULERS  # diffusers loads only when images are drawn

        _require(
            isinstance(self.num_inference_steps, int) and self.num_inference_steps >= 1,
            f"num_inference_steps must be >= 1, got {self.num_inference_steps}",
        )
        _require(
            math.isfinite(self.guidance_scale) and self.guidance_scale >= 0,
            f"guidance_scale must be >= 0, got {self.guidance_scale}",
        )
        _require(
            self.scheduler in SCHEDULERS, f"unknown scheduler {self.scheduler!r}; choose one of {sorted(SCHEDULERS)}"
        )
        _require(
            isinstance(self.num_images, int) and self.num_images >= 1, f"num_images must be >= 1, got {self.num_images}"
        )
        _require(isinstance(self.seed, int), f"seed must be an int, got {self.seed!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            _require(
                value is None or value == image_size,
                f"{name}={value}: this model generates {image_size}x{image_size} images; leave {name} unset",
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
