"""The ``mm_interleaved`` model folder: registration with ComfyUI's ``folder_paths`` and the list of models.

A model is a folder (our checkpoint format: ``config.json`` + ``weights_index.json`` + safetensors, tokenizer in
``tokenizer/``) anywhere under ``ComfyUI/models/mm_interleaved/`` or under an ``mm_interleaved:`` entry of the
user's ``extra_model_paths.yaml``. ``folder_paths`` lists files, not folders, so the folder type is registered
with the extension ``.json``: a folder is a model when the list holds both its ``config.json`` and its
``weights_index.json``. This keeps ComfyUI's cached, mtime-checked file listing and the extra-paths handling.
The embedded model shipped with the pack is always offered first, as ``EMBEDDED``.
"""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths

FOLDER = "mm_interleaved"
EMBEDDED = "embedded"
MARKER_FILES = ("config.json", "weights_index.json")


def register() -> None:
    """Add ``<models>/mm_interleaved`` (first) to the folder type, keeping paths a user's yaml added, and only list
    ``.json`` files (idempotent)."""
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER), is_default=True)
    paths, _ = folder_paths.folder_names_and_paths[FOLDER]
    folder_paths.folder_names_and_paths[FOLDER] = (paths, {".json"})


def _json_files_by_folder() -> dict[str, set[str]]:
    """The ``.json`` files of the model roots, by folder (relative, ``/``-separated)."""
    files_by_folder: dict[str, set[str]] = {}
    for relative in folder_paths.get_filename_list(FOLDER):
        parent, name = os.path.split(relative)
        if parent:
            files_by_folder.setdefault(Path(parent).as_posix(), set()).add(name)
    return files_by_folder


def model_names() -> list[str]:
    """``EMBEDDED`` and every model folder, as paths relative to their models root (``/``-separated), sorted."""
    found = sorted(p for p, names in _json_files_by_folder().items() if names.issuperset(MARKER_FILES))
    return [EMBEDDED] + found


def unconverted_folders() -> list[str]:
    """Folders with JSON files but without the model marker files, outside every model folder: typically an official
    release (``pytorch_model.bin.index.json``) or a Hugging Face download put there before conversion."""
    by_folder = _json_files_by_folder()
    models = [p for p, names in by_folder.items() if names.issuperset(MARKER_FILES)]
    return sorted(p for p in by_folder if p not in models and not any(p.startswith(f"{model}/") for model in models))


def missing_model_message(name: str, names: list[str]) -> str:
    """Why model ``name`` is not offered, and what to do."""
    message = f"no MM-Interleaved model {name!r} here; installed: {names} (folders under models/mm_interleaved/)"
    unconverted = unconverted_folders()
    if name in unconverted:
        return (
            f"{message}. The folder {name!r} exists but is not a model in this pack's format (it has no "
            f"{MARKER_FILES[1]}): convert the official release into a new folder with `python -m "
            f"comfy_mm_interleaved convert-official SRC_FOLDER models/mm_interleaved/<name>`, then refresh"
        )
    if unconverted:
        return f"{message}. Not converted (see convert-official in the README): {unconverted}"
    return message


def model_path(name: str) -> Path | None:
    """The folder of model ``name`` (None for the embedded model); a clear error when it is not (or no longer) there."""
    if name == EMBEDDED:
        return None
    config = folder_paths.get_full_path(FOLDER, os.path.join(name, MARKER_FILES[0]))
    if config is None:
        roots = ", ".join(folder_paths.get_folder_paths(FOLDER))
        raise FileNotFoundError(
            f"no MM-Interleaved model folder {name!r} under {roots}; put the model folder (config.json, "
            f"weights_index.json, safetensors, tokenizer/) there and refresh, or choose {EMBEDDED!r}"
        )
    return Path(config).parent
