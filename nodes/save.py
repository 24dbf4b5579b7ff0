"""Save an interleaved document: its images as PNG, the document as JSON and a readable, standalone HTML page.

Files go to ComfyUI's output folder as ``<prefix>_<counter>_.json`` / ``.html`` with ``<prefix>_<counter>_-NN.png``
beside them (ComfyUI's counter naming); the PNGs carry the workflow as ComfyUI's Save Image writes it. The JSON is
``Interleaved.to_json``'s format and reloads with ``Interleaved.from_json``.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

import folder_paths
from comfy.cli_args import args
from comfy_api.latest import io
from PIL.PngImagePlugin import PngInfo

from comfy_mm_interleaved.inference import Interleaved
from comfy_mm_interleaved.inference.document import ImagePart

from .context import context_input
from .load_document import forget_document_choices
from .types import CATEGORY

PAGE_STYLE = (
    "body{font-family:sans-serif;max-width:46em;margin:2em auto;line-height:1.5;background:#fafafa}"
    "img{display:block;margin:1em 0;image-rendering:pixelated;width:256px;border:1px solid #ccc}"
    "p{margin:.6em 0}.pending{color:#888;font-style:italic}"
)


def html_page(doc: Interleaved, images: list[tuple[str, bytes] | None], title: str) -> str:
    """A standalone HTML page: text segments as paragraphs, images in place. ``images``: (file name, PNG bytes) of
    each image segment (None: pending); the PNGs are embedded as data URIs, so the page needs no other file (ComfyUI
    serves an .html output as a download, and a downloaded page would lose relative image links)."""
    body, k = [], 0
    for segment in doc:
        if isinstance(segment, ImagePart):
            image = images[k]
            k += 1
            if image is None:
                body.append(f'<p class="pending">[image {k}: not generated yet]</p>')
            else:
                name, png = image
                source = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
                body.append(f'<img src="{source}" alt="image {k}" title="{html.escape(name)}">')
        elif segment.text.strip():
            body.append(f"<p>{html.escape(segment.text.strip())}</p>")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{PAGE_STYLE}</style></head>\n<body>\n<h1>{html.escape(title)}</h1>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def workflow_metadata(prompt: dict | None, extra_pnginfo: dict | None) -> PngInfo | None:
    """PNG text chunks as ComfyUI's Save Image writes them (``prompt`` and the workflow), so dropping a saved PNG
    onto ComfyUI reloads the workflow; None with ``--disable-metadata``."""
    if args.disable_metadata or (prompt is None and not extra_pnginfo):
        return None
    metadata = PngInfo()
    if prompt is not None:
        metadata.add_text("prompt", json.dumps(prompt))
    for key, value in (extra_pnginfo or {}).items():
        metadata.add_text(key, json.dumps(value))
    return metadata


def save_document(
    doc: Interleaved, output_dir: str, prefix: str, pnginfo: PngInfo | None = None
) -> tuple[Path, Path, list[Path]]:
    """Write ``doc`` under ``output_dir`` with ComfyUI's counter naming: ``(json, html, image files)``."""
    folder, filename, counter, _, _ = folder_paths.get_save_image_path(prefix, output_dir)
    stem = f"{filename}_{counter:05}_"  # ComfyUI's own pattern, which its counter recognises
    json_path = doc.to_json(Path(folder) / f"{stem}.json", pnginfo)
    names = doc.image_file_names(stem)
    images = [None if n is None else (n, (json_path.parent / n).read_bytes()) for n in names]
    html_path = json_path.with_suffix(".html")
    html_path.write_text(html_page(doc, images, stem), encoding="utf-8")
    return json_path, html_path, [json_path.parent / n for n in names if n is not None]


class SaveInterleaved(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MMI_SaveInterleaved",
            display_name="Save interleaved document (HTML)",
            category=CATEGORY,
            description="Writes the document's images (PNG), the document (JSON) and a readable HTML page into "
            "ComfyUI's output folder.",
            inputs=[
                context_input("The document to save."),
                io.String.Input(
                    "filename_prefix",
                    default="mm_interleaved/story",
                    tooltip="Path prefix inside the output folder; a counter is appended.",
                ),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, context: Interleaved, filename_prefix: str) -> io.NodeOutput:
        if len(context) == 0:
            raise ValueError("Save interleaved document: the context is empty, nothing to save")
        output_dir = folder_paths.get_output_directory()
        hidden = cls.hidden  # None when called outside ComfyUI's executor
        metadata = workflow_metadata(getattr(hidden, "prompt", None), getattr(hidden, "extra_pnginfo", None))
        json_path, html_path, images = save_document(context, output_dir, filename_prefix, metadata)
        forget_document_choices()  # 'Load interleaved document' offers it from the next refresh on
        subfolder = os.path.relpath(json_path.parent, output_dir)
        subfolder = "" if subfolder == "." else Path(subfolder).as_posix()
        return io.NodeOutput(
            ui={
                "images": [{"filename": p.name, "subfolder": subfolder, "type": "output"} for p in images],
                "text": [context.to_readable_text()],
                "html": [Path(os.path.relpath(html_path, output_dir)).as_posix()],
            }
        )
