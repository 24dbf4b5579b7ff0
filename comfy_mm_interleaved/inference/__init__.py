"""Inference: the ``Interleaved`` document type and the cached generation engine (see ``engine.py``).

Names are imported lazily, so ``comfy_mm_interleaved.inference.cli`` (the ``generate`` subcommand's arguments)
loads without torch until a command runs.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ImagePart": "document",
    "Interleaved": "document",
    "TextPart": "document",
    "load_documents": "document",
    "CachePolicy": "engine",
    "EncodedImage": "engine",
    "ImageResult": "engine",
    "InjectedNoise": "engine",
    "InterleavedEngine": "engine",
    "TextResult": "engine",
    "resolve_model_dir": "engine",
    "ImageOptions": "options",
    "TextOptions": "options",
    "CancelFlag": "progress",
    "GenerationCancelled": "progress",
    "ProgressEvent": "progress",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return __all__
