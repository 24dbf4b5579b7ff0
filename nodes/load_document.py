"""Load an interleaved document from a file: continue a story saved in an earlier session, or start from a document
written by hand or by ``python -m comfy_mm_interleaved generate``.

Choices: ``.json`` / ``.jsonl`` files in ComfyUI's input folder, and the documents *Save interleaved document* wrote
in the output folder (a ``.json`` with its ``.html`` beside it), annotated ``[output]`` as ComfyUI's own loaders
annotate output files. The formats are those of ``comfy_mm_interleaved.inference.load_documents``: a segment list,
``{"segments": [...]}``, JSON lines, or the official demo annotation; image paths are relative to the file.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import folder_paths
from comfy_api.latest import io

from comfy_mm_interleaved.inference.document import check_inside, document_files, load_document

from .context import CONTEXT_CATEGORY, context_output

OUTPUT_TAG = " [output]"
SUFFIXES = (".json", ".jsonl")
LIST_CACHE_SECONDS = 2.0  # ComfyUI asks for the node's schema several times per queued prompt; saves reset it
_listing: dict[tuple[str, str], tuple[float, list[str]]] = {}


def _visible(path: Path, folder: Path) -> bool:
    """Not hidden (``.ipynb_checkpoints/``, macOS ``._x.json``), by any part of its path inside ``folder``."""
    return not any(part.startswith(".") for part in path.relative_to(folder).parts)


def forget_document_choices() -> None:
    """Drop the cached list (the save node calls this, so a document it just wrote is offered at once)."""
    _listing.clear()


def document_choices() -> list[str]:
    """The selectable files: input-folder documents by relative path, saved documents with ``OUTPUT_TAG``."""
    input_dir = Path(folder_paths.get_input_directory())
    output_dir = Path(folder_paths.get_output_directory())
    key = (str(input_dir), str(output_dir))
    cached = _listing.get(key)
    if cached is not None and time.monotonic() - cached[0] < LIST_CACHE_SECONDS:
        return list(cached[1])
    names = sorted(
        p.relative_to(input_dir).as_posix()
        for p in input_dir.rglob("*")
        if p.suffix.lower() in SUFFIXES and p.is_file() and _visible(p, input_dir)
    )
    saved = sorted(
        p.relative_to(output_dir).as_posix()
        for p in output_dir.rglob("*.json")
        if p.with_suffix(".html").is_file() and _visible(p, output_dir)
    )
    choices = names + [name + OUTPUT_TAG for name in saved]
    _listing[key] = (time.monotonic(), choices)
    return list(choices)


def document_folder(choice: str) -> tuple[str, Path]:
    """``(file name, folder)`` of a choice, by ComfyUI's own annotations: the output folder for ``[output]``, else
    the input folder (``[temp]`` is refused)."""
    name, folder = folder_paths.annotated_filepath(choice)
    if folder is not None and Path(folder).resolve() == Path(folder_paths.get_temp_directory()).resolve():
        raise ValueError(f"document {choice!r}: only input-folder files and '[output]' documents can be loaded")
    return name, Path(folder or folder_paths.get_input_directory())


def resolve_document(choice: str | None) -> Path:
    """The file behind a choice; a clear error when none is chosen, or it is missing, not a document, or outside
    the input and output folders."""
    if not choice:
        raise ValueError(
            "no document chosen: put a .json or .jsonl document into ComfyUI's input folder "
            f"({folder_paths.get_input_directory()}) or save one with 'Save interleaved document', then press R to "
            "refresh the list"
        )
    name, folder = document_folder(choice)
    path = folder / name
    check_inside(path, folder, f"document {choice!r}")
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"document {choice!r} is not a .json or .jsonl file")
    if not path.is_file():
        raise ValueError(
            f"document {choice!r} not found in {folder}; put the .json file there (its images beside it) and "
            "refresh the node list (press R), or pick another document"
        )
    return path


class LoadInterleaved(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MMI_LoadInterleaved",
            display_name="Load interleaved document",
            category=CONTEXT_CATEGORY,
            description="Reads a document (text and images) from a JSON file: one saved by 'Save interleaved "
            "document' (to continue it), or one of the input folder.",
            inputs=[
                io.Combo.Input(
                    "document",
                    options=document_choices(),
                    tooltip="A .json / .jsonl file of ComfyUI's input folder, or a document saved into the output "
                    "folder ('[output]'). Press R to refresh the list after adding files.",
                ),
                io.Int.Input(
                    "index",
                    default=0,
                    min=0,
                    max=1_000_000,
                    tooltip="Which document of a file that holds several (JSON lines, an official annotation); "
                    "0 for a single document.",
                ),
            ],
            outputs=[
                context_output("The document, ready to continue or to answer questions about."),
                io.String.Output(display_name="text", tooltip="The document as readable text, with <image k> markers."),
            ],
        )

    @classmethod
    def validate_inputs(cls, document: str | None = None) -> bool | str:
        try:
            resolve_document(document)
        except ValueError as err:
            return str(err)
        return True

    @classmethod
    def fingerprint_inputs(cls, document: str | None = None, index: int = 0) -> object:
        """Run again when the document changes: its file's bytes, or an image file it names."""
        try:
            path = resolve_document(document)
            files = document_files(path, index)
            stamps = []
            for file in files[1:]:
                try:
                    stat = file.stat()
                    stamps.append((str(file), stat.st_mtime_ns, stat.st_size))
                except OSError:
                    stamps.append((str(file), None, None))
            return (document, index, hashlib.sha256(path.read_bytes()).hexdigest(), tuple(stamps))
        except (ValueError, OSError):
            return float("nan")  # never equal to itself: always re-run, so the error shows

    @classmethod
    def execute(cls, document: str | None, index: int) -> io.NodeOutput:
        path = resolve_document(document)
        doc, _ = load_document(path, index, root=document_folder(document)[1])
        if len(doc) == 0:
            raise ValueError(f"Load interleaved document: {document!r} is an empty document; add text or images to it")
        return io.NodeOutput(doc, doc.to_readable_text())
