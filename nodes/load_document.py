"""Load an interleaved document from a file: continue a story saved in an earlier session, or start from a document
written by hand or by ``python -m comfy_mm_interleaved generate``.

Choices: ``.json`` / ``.jsonl`` files in ComfyUI's input folder, and the documents *Save interleaved document* wrote
in the output folder (a ``.json`` with its ``.html`` beside it), annotated ``[output]`` as ComfyUI's own loaders
annotate output files. The formats are those of ``comfy_mm_interleaved.inference.load_documents``: a segment list,
``{"segments": [...]}``, JSON lines, or the official demo annotation; image paths are relative to the file.
"""

from __future__ import annotations

from pathlib import Path

import folder_paths
from comfy_api.latest import io

from comfy_mm_interleaved.inference.document import load_documents

from .context import CONTEXT_CATEGORY, context_output

OUTPUT_TAG = " [output]"
INPUT_SUFFIXES = (".json", ".jsonl")


def document_choices() -> list[str]:
    """The selectable files: input-folder documents by relative path, saved documents with ``OUTPUT_TAG``."""
    input_dir = Path(folder_paths.get_input_directory())
    names = sorted(
        p.relative_to(input_dir).as_posix()
        for p in input_dir.rglob("*")
        if p.suffix.lower() in INPUT_SUFFIXES and p.is_file()
    )
    output_dir = Path(folder_paths.get_output_directory())
    saved = sorted(
        p.relative_to(output_dir).as_posix() for p in output_dir.rglob("*.json") if p.with_suffix(".html").is_file()
    )
    return names + [name + OUTPUT_TAG for name in saved]


def resolve_document(choice: str) -> Path:
    """The file behind a choice; a clear error when it is missing or lies outside the input and output folders."""
    name, folder = folder_paths.annotated_filepath(choice)
    base = Path(folder or folder_paths.get_input_directory()).resolve()
    path = (base / name).resolve()
    if not path.is_relative_to(base):
        raise ValueError(f"document {choice!r} lies outside ComfyUI's {'output' if folder else 'input'} folder")
    if not path.is_file():
        where = "output" if choice.endswith(OUTPUT_TAG) else "input"
        raise ValueError(
            f"document {choice!r} not found in ComfyUI's {where} folder ({base}); put the .json file there "
            "(its images beside it) and refresh the node list (press R), or pick another document"
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
    def validate_inputs(cls, document: str) -> bool | str:
        if document is None:
            return True
        try:
            resolve_document(document)
        except ValueError as err:
            return str(err)
        return True

    @classmethod
    def fingerprint_inputs(cls, document: str, index: int) -> object:
        """Run again when the file changes (an edit, or a new save under the same name)."""
        try:
            stat = resolve_document(document).stat()
        except (ValueError, OSError):
            return float("nan")  # never equal to itself: always re-run, so the error shows
        return (document, index, stat.st_mtime_ns, stat.st_size)

    @classmethod
    def execute(cls, document: str, index: int) -> io.NodeOutput:
        docs = load_documents(resolve_document(document))
        if index >= len(docs):
            raise ValueError(
                f"Load interleaved document: {document!r} holds {len(docs)} document(s), so index {index} does not "
                f"exist; use 0 to {len(docs) - 1}"
            )
        doc = docs[index]
        return io.NodeOutput(doc, doc.to_readable_text())
