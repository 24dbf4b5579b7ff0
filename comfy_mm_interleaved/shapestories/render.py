"""Rendering of one ShapeStories image.

A square RGB image of side ``S`` (any S >= 8; the embedded model uses 32 or 64) on a black background with one
filled shape in a palette colour. Anti-aliasing follows the rules exactly: the shape is drawn at 4x (a sub-pixel is
inside when its centre is inside the ideal shape) and the 4x4 blocks are averaged (box filter), so every pixel is
``round(colour * coverage)`` with ``coverage`` in {0, 1/16, ..., 1}. Pure numpy, hence deterministic and
independent of the Pillow version.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .rules import PALETTE, Attributes, shape_contains

SUPERSAMPLE = 4
MIN_IMAGE_SIZE = 8


def check_image_size(size: int) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or size < MIN_IMAGE_SIZE:
        raise ValueError(f"image size must be an int >= {MIN_IMAGE_SIZE} pixels, got {size!r}")
    return size


def subpixel_centres(size: int, factor: int = SUPERSAMPLE) -> tuple[np.ndarray, np.ndarray]:
    """Centres of the ``factor x factor`` sub-pixels of a ``size`` image, as fractions: x [1, size*f], y [size*f, 1]."""
    coords = (np.arange(size * factor, dtype=np.float64) + 0.5) / (size * factor)
    return coords[None, :], coords[:, None]


def box_downsample(mask: np.ndarray, factor: int = SUPERSAMPLE) -> np.ndarray:
    """[H*f, W*f] boolean/float -> [H, W] float: the mean of every ``factor x factor`` block."""
    height, width = mask.shape[0] // factor, mask.shape[1] // factor
    return mask.reshape(height, factor, width, factor).mean(axis=(1, 3), dtype=np.float64)


def coverage(attributes: Attributes, size: int) -> np.ndarray:
    """[S, S] float in [0, 1]: the fraction of each pixel covered by the shape (4x supersampled)."""
    x, y = subpixel_centres(check_image_size(size))
    cx, cy = attributes.centre
    return box_downsample(shape_contains(attributes.shape, x, y, cx, cy, attributes.radius))


def render_array(attributes: Attributes, size: int) -> np.ndarray:
    """[S, S, 3] uint8 image of ``attributes``."""
    colour = np.asarray(PALETTE[attributes.colour], dtype=np.float64)
    return np.rint(coverage(attributes, size)[:, :, None] * colour).astype(np.uint8)


def render(attributes: Attributes, size: int) -> Image.Image:
    """The image of ``attributes`` as an RGB PIL image of side ``size``."""
    return Image.fromarray(render_array(attributes, size))
