"""Context nodes: start a document, append text, append image(s), read it as text.

An ``MMI_CONTEXT`` socket carries a ``comfy_mm_interleaved.inference.Interleaved`` document. It is immutable: every
append returns a new document, so one context can feed several branches of a graph and ComfyUI's output cache
never sees a value change under it.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from comfy_mm_interleaved.inference import Interleaved

from .encode import EncodedImages, alpha_input, with_alpha
from .types import CATEGORY, MMIContext, MMIImageFeatures

CONTEXT_CATEGORY = f"{CATEGORY}/context"


def context_input(tooltip: str = "The interleaved document so far.") -> io.Input:
    return MMIContext.Input("context", tooltip=tooltip)


def context_output(tooltip: str = "The document with the new segment appended.") -> io.Output:
    return MMIContext.Output(display_name="context", tooltip=tooltip)


class StartContext(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MMI_StartContext",
            display_name="Start MM-Interleaved context",
            category=CONTEXT_CATEGORY,
            description="Starts an interleaved image-text document, optionally with some text.",
            inputs=[
                io.String.Input(
                    "text",
                    multiline=True,
                    default="",
                    tooltip="Opening text of the document (may be empty: then append images or text next).",
                )
            ],
            outputs=[context_output("A new document.")],
        )

    @classmethod
    def execute(cls, text: str) -> io.NodeOutput:
        return io.NodeOutput(Interleaved([text] if text.strip() else []))


class AppendText(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MMI_AppendText",
            display_name="Append text",
            category=CONTEXT_CATEGORY,
            description="Appends a piece of text to the document.",
            inputs=[
                context_input(),
                io.String.Input("text", multiline=True, default="", tooltip="The text to append."),
            ],
            outputs=[context_output()],
        )

    @classmethod
    def execute(cls, context: Interleaved, text: str) -> io.NodeOutput:
        if not text.strip():
            raise ValueError("Append text: the text is empty; type some text or remove this node")
        return io.NodeOutput(context.append_text(text))


class AppendImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MMI_AppendImage",
            display_name="Append image(s)",
            category=CONTEXT_CATEGORY,
            description="Appends images to the document, in batch order. Chain several to interleave with text.",
            inputs=[
                context_input(),
                io.MultiType.Input(
                    "images",
                    types=[io.Image, MMIImageFeatures],
                    tooltip="An IMAGE batch, or the output of 'Encode images' (then the features are reused and "
                    "the images are not encoded again).",
                ),
                alpha_input(),
            ],
            outputs=[context_output()],
        )

    @classmethod
    def execute(
        cls, context: Interleaved, images: torch.Tensor | EncodedImages, alpha: torch.Tensor | None = None
    ) -> io.NodeOutput:
        if isinstance(images, EncodedImages):
            if alpha is not None:
                raise ValueError("Append image(s): connect the alpha mask to 'Encode images', not here")
            return io.NodeOutput(images.append_to(context))
        if alpha is not None:
            images = with_alpha(images, alpha)
        return io.NodeOutput(context.append_image(images))


class ContextToText(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MMI_ContextToText",
            display_name="Context to text",
            category=CONTEXT_CATEGORY,
            description="The document as readable text, with <image k> markers where its images are.",
            inputs=[context_input("The document to show.")],
            outputs=[io.String.Output(display_name="text", tooltip="e.g. '<image 1> a small red circle ...'")],
        )

    @classmethod
    def execute(cls, context: Interleaved) -> io.NodeOutput:
        return io.NodeOutput(context.to_readable_text())
