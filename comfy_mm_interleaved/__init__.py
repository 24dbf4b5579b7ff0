"""comfy_mm_interleaved: MM-Interleaved as a PyTorch library (models, ops, inference, training)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


def _expose_source_kernels() -> None:
    """Make the repository's top-level ``kernels/`` folder importable as ``comfy_mm_interleaved.kernels``.

    An installed package (wheel or editable) maps it there through ``[tool.setuptools] package-dir``. A plain
    source checkout (``PYTHONPATH=repo``, or the ComfyUI custom-node folder) has no such mapping, so the folder
    beside this package is registered under the same qualified name. It is never importable as a bare
    top-level ``kernels`` (a PyPI package of that name exists and transformers may import it).
    """
    name = f"{__name__}.kernels"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    folder = Path(__file__).resolve().parent.parent / "kernels"
    if not (folder / "__init__.py").is_file():
        return
    init = folder / "__init__.py"
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(folder)])
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_expose_source_kernels()
