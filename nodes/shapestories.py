"""Draw a ShapeStories image: example workflows run out of the box, with no input file, on the embedded model.

The image follows the corpus rules exactly (``comfy_mm_interleaved.shapestories``), with the radius in the middle
of its size range and no jitter; the second output is its true caption sentence.
"""

from __future__ import annotations

import numpy as np
import torch
from comfy_api.latest import io

from comfy_mm_interleaved.shapestories import Attributes, caption_sentence, render_array
from comfy_mm_interleaved.shapestories.rules import COLOURS, COLUMNS, RADIUS_RANGES, ROWS, SHAPES, SIZES

from .types import CATEGORY


def draw(shape: str, colour: str, size: str, row: str, column: str, image_size: int) -> tuple[torch.Tensor, str]:
    """ComfyUI IMAGE ``[1, S, S, 3]`` in [0, 1] and the caption sentence of one centred, mid-sized shape."""
    low, high = RADIUS_RANGES[size]
    attributes = Attributes(shape, colour, size, row, column, radius=(low + high) / 2, jitter=(0.0, 0.0))
    pixels = render_array(attributes, image_size).astype(np.float32) / 255.0
    return torch.from_numpy(pixels)[None], caption_sentence(attributes)


class ShapeStoriesImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MMI_ShapeStoriesImage",
            display_name="Draw ShapeStories image",
            category=f"{CATEGORY}/ShapeStories",
            description="Draws one shape on black exactly as the ShapeStories corpus of the embedded model does.",
            inputs=[
                io.Combo.Input("shape", options=list(SHAPES), default=SHAPES[0], tooltip="Which shape to draw."),
                io.Combo.Input("colour", options=list(COLOURS), default=COLOURS[0], tooltip="Its palette colour."),
                io.Combo.Input("size", options=list(SIZES), default=SIZES[0], tooltip="small or large."),
                io.Combo.Input("row", options=list(ROWS), default=ROWS[0], tooltip="Row of the 3 x 3 grid."),
                io.Combo.Input(
                    "column", options=list(COLUMNS), default=COLUMNS[0], tooltip="Column of the 3 x 3 grid."
                ),
                io.Int.Input(
                    "image_size",
                    default=64,
                    min=8,
                    max=1024,
                    step=8,
                    tooltip="Side of the square image in pixels (the embedded model reads and writes 64).",
                ),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="The drawn image [1, S, S, 3]."),
                io.String.Output(
                    display_name="caption", tooltip="Its true caption, e.g. 'a small red circle at top left.'"
                ),
            ],
        )

    @classmethod
    def execute(cls, shape: str, colour: str, size: str, row: str, column: str, image_size: int) -> io.NodeOutput:
        return io.NodeOutput(*draw(shape, colour, size, row, column, image_size))
