"""ComfyUI V3 nodes of the MM-Interleaved pack (thin wrappers over ``comfy_mm_interleaved``).

Imported only relatively, from the pack's root ``__init__.py``; never importable as a bare ``nodes``.
One file per concept: ``loader`` (model + ComfyUI model management), ``encode`` (image features), ``context``
(documents), ``load_document`` (a document from a JSON file), ``generate`` (text, image, auto), ``save`` (PNG +
JSON + HTML), ``shapestories`` (example inputs).
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import model_folder
from .context import AppendImage, AppendText, ContextToText, StartContext
from .encode import EncodeImages
from .generate import GenerateImage, GenerateInterleaved, GenerateText
from .load_document import LoadInterleaved
from .loader import LoadModel
from .save import SaveInterleaved
from .shapestories import ShapeStoriesImage

NODES: list[type[io.ComfyNode]] = [
    LoadModel,
    EncodeImages,
    StartContext,
    LoadInterleaved,
    AppendText,
    AppendImage,
    ContextToText,
    GenerateText,
    GenerateImage,
    GenerateInterleaved,
    SaveInterleaved,
    ShapeStoriesImage,
]


class MMInterleavedExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        model_folder.register()
        return list(NODES)
