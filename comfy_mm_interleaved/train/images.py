"""Image loading and the dual encoder/decoder transforms of the official data pipeline."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..inference.document import to_rgb
from .documents import BadInput


def load_image(source: Any, image_root: str | Path | None = None) -> Image.Image:
    """Decode an image from a path (relative to ``image_root``), raw bytes or a PIL image, as RGB.

    The conversion is the inference engine's (``inference.document.to_rgb``: alpha composited onto white, 16-bit
    scaled to 8 bits), so a model sees the same pixels in training and in use; the official ``convert("RGB")``
    keeps the colour under transparent pixels and clips 16-bit values. Raises ``BadInput`` (``missing_file`` /
    ``corrupt_image``) so that a data stream can skip the document.
    """
    if isinstance(source, Image.Image):
        return _rgb(source, "image")
    try:
        if isinstance(source, bytes | bytearray):
            image = Image.open(io.BytesIO(source))
        else:
            path = Path(source)
            if image_root is not None and not path.is_absolute():
                path = Path(image_root) / path
            image = Image.open(path)
        image.load()  # decode now: a truncated file fails here, not later in a worker
        return _rgb(image, str(source) if not isinstance(source, bytes | bytearray) else "<bytes>")
    except FileNotFoundError as err:
        raise BadInput("missing_file", str(err)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadInput("corrupt_image", f"{source if not isinstance(source, bytes) else '<bytes>'}: {err}") from None


def _rgb(image: Image.Image, name: str) -> Image.Image:
    try:
        return to_rgb(image, name)
    except ValueError as err:  # a mode with no unambiguous RGB reading
        raise BadInput("corrupt_image", str(err)) from None


def center_crop(image: Image.Image, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` (box-halving first, then bicubic) and center-crop: [3, S, S] in [0, 1].

    This is the guided-diffusion style crop the official ``transform_numpy`` uses (no flip).
    """
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    arr = arr[top : top + size, left : left + size]
    return torch.from_numpy(arr.astype(np.float32).transpose(2, 0, 1) / 255.0)


class DualTransform:
    """One PIL image -> (encoder tensor [3, enc, enc], decoder tensor [3, dec, dec] or None), both in [0, 1]."""

    def __init__(self, encoder_size: int = 224, decoder_size: int | None = 512) -> None:
        self.encoder_size = encoder_size
        self.decoder_size = decoder_size  # None: no decoder image (no image loss)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor | None]:
        decoder = None if self.decoder_size is None else center_crop(image, self.decoder_size)
        return center_crop(image, self.encoder_size), decoder
