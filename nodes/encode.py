"""Encode images node: IMAGE -> ``MMI_IMAGE_FEATURES`` (the visual tokenizer runs once per distinct image).

The engine caches every image's features under a hash of its pixels, so an image that appears twice in a document,
or in two documents, is encoded once. This node runs the encoder ahead of generation (with its own progress bar)
and hands on the images together with their features; 'Append image(s)' accepts them in place of an IMAGE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from comfy_api.latest import io
from PIL import Image

from comfy_mm_interleaved.inference import Interleaved
from comfy_mm_interleaved.inference.document import tensor_to_images

from .loader import LoadedModel
from .progress import ComfyProgress
from .types import CATEGORY, MMIImageFeatures, MMIModel


@dataclass(frozen=True, eq=False)
class EncodedImages:
    """What an ``MMI_IMAGE_FEATURES`` socket carries: RGB images whose features sit in the engine's cache under
    ``keys`` (pixel hashes). The feature tensors themselves stay with the engine, so ComfyUI's output cache never
    pins device memory that ComfyUI's model management cannot see."""

    images: tuple[Image.Image, ...]
    keys: tuple[str, ...]
    model_name: str

    def append_to(self, context: Interleaved) -> Interleaved:
        for image in self.images:
            context = context.append_image(image)
        return context


def with_alpha(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """IMAGE [B, H, W, 3] + ComfyUI MASK [B or 1, H, W] (1 = transparent, as Load Image gives it) -> RGBA images.

    The document composites transparent pixels onto white, as the model's training pipeline does.
    """
    if images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"an image with alpha needs an RGB IMAGE [B, H, W, 3], got shape {tuple(images.shape)}")
    if mask.dim() == 2:
        mask = mask[None]
    batch, height, width, _ = images.shape
    if mask.dim() != 3 or tuple(mask.shape[1:]) != (height, width) or mask.shape[0] not in (1, batch):
        raise ValueError(
            f"the alpha mask has shape {tuple(mask.shape)} but the image batch is {batch} x {height} x {width}; "
            f"connect the MASK that belongs to these images (same height and width, batch 1 or {batch})"
        )
    alpha = 1.0 - mask.to(images.device, images.dtype).clamp(0, 1)
    return torch.cat([images, alpha.expand(batch, height, width)[..., None]], dim=-1)


def alpha_input() -> io.Input:
    return io.Mask.Input(
        "alpha",
        optional=True,
        tooltip="Optional transparency of the images (the MASK of Load Image: 1 = transparent); transparent pixels "
        "become white. Must have the images' height and width.",
    )


class EncodeImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MMI_EncodeImages",
            display_name="Encode images",
            category=CATEGORY,
            description="Runs the model's image encoder once per distinct image; connect the result to "
            "'Append image(s)' (as often as you like: it is never encoded again).",
            inputs=[
                MMIModel.Input("model", tooltip="The model whose image encoder to use."),
                io.Image.Input("images", tooltip="The images to encode (a batch is encoded in order)."),
                alpha_input(),
            ],
            outputs=[MMIImageFeatures.Output(display_name="features", tooltip="The images and their features.")],
        )

    @classmethod
    def execute(cls, model: LoadedModel, images: torch.Tensor, alpha: torch.Tensor | None = None) -> io.NodeOutput:
        if alpha is not None:
            images = with_alpha(images, alpha)
        pil = tuple(tensor_to_images(images, "images"))
        features = model.engine_ready().encode_images(list(pil), progress=ComfyProgress())
        return io.NodeOutput(EncodedImages(pil, tuple(f.key for f in features), model.name))
