"""ComfyUI entry point of the MM-Interleaved node pack.

ComfyUI imports this file as a package under a module name derived from the pack's folder path, so the folder
may be called anything. The library is always imported by its absolute name ``comfy_mm_interleaved``: this
clone's own copy, registered by path when it is not imported yet (a plain clone needs no ``pip install -e``).
Nothing here touches ComfyUI's modules until ComfyUI calls ``comfy_entrypoint``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_LIBRARY = "comfy_mm_interleaved"


def _load_library() -> None:
    if _LIBRARY in sys.modules:
        return
    folder = Path(__file__).resolve().parent / _LIBRARY
    spec = importlib.util.spec_from_file_location(
        _LIBRARY, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the comfy_mm_interleaved library from {folder}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_LIBRARY] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_LIBRARY]
        raise


_load_library()


async def comfy_entrypoint():  # noqa: ANN201 - ComfyUI's own types are imported lazily
    from .nodes import MMInterleavedExtension

    return MMInterleavedExtension()
