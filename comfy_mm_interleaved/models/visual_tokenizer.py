"""Visual tokenizer: images -> visual tokens for the LLM + the 4-level feature pyramid for MMFS.

    images [B, 3, S, S] in [0, 1] -> CLIP normalisation -> VisionEncoder (CLIP ViT + ViT-Adapter)
      last_hidden_state [B, 1 + g*g, C] -> post_ln(pos_ln(pos_proj(.)) + pos_embed) -> Q-Former -> proj
        -> vis_embed [B, num_img_token, llm_hidden]
      multiscale maps [B, C, 4g..g/2] + fixed 2-D sin-cos (the g x g table resized bicubically to each map)

State-dict keys (relative to ``visual_tokenizer.``): ``clip_mean``, ``clip_std``, ``pos_embed`` (fixed buffers,
stored in the official checkpoint), ``encoder.vision_model.*``, ``pos_proj``, ``pos_ln``, ``post_ln``,
``perceiver_resampler.*``, ``proj``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from ..config import MMInterleavedConfig
from .posembed import resize_grid_embedding, sincos_2d
from .qformer import QFormerResampler
from .vision_encoder import VisionEncoder

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisualTokenizerOutput:
    vis_embed: torch.Tensor  # [B, num_img_token, llm_hidden]
    multiscale_features: list[torch.Tensor]  # 4 x [B, C, H_l, W_l], sin-cos position embedding added
    last_hidden_state: torch.Tensor  # [B, 1 + g*g, C], raw output of the last ViT layer


class VisualTokenizer(nn.Module):
    def __init__(self, config: MMInterleavedConfig) -> None:
        super().__init__()
        vt = config.visual_tokenizer
        dim = vt.encoder.hidden_size
        if vt.resampler.encoder_hidden_size != dim:
            raise ValueError(
                f"visual resampler encoder_hidden_size ({vt.resampler.encoder_hidden_size}) must equal the "
                f"vision encoder hidden_size ({dim})"
            )
        if vt.resampler.num_queries != config.num_img_token:
            raise ValueError(
                f"visual resampler num_queries ({vt.resampler.num_queries}) must equal num_img_token "
                f"({config.num_img_token})"
            )
        if config.image_embed_dim != dim:
            raise ValueError(f"image_embed_dim ({config.image_embed_dim}) must equal the vision hidden_size ({dim})")
        self.image_size = vt.encoder.image_size
        self.register_buffer("clip_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1))
        self.register_buffer("clip_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1))
        self.encoder = VisionEncoder(vt.encoder)
        self.pos_proj = nn.Linear(dim, dim)
        self.pos_ln = nn.LayerNorm(dim, eps=1e-6)
        # fixed (not trainable) [1 + g*g, C] table with a zero CLS row; a checkpoint key, hence a persistent buffer
        self.register_buffer("pos_embed", sincos_2d(dim, vt.pos_grid_size, cls_token=True))
        self.post_ln = nn.LayerNorm(dim, eps=1e-6)
        self.perceiver_resampler = QFormerResampler(vt.resampler)
        self.proj = nn.Linear(vt.resampler.hidden_size, config.llm.hidden_size)
        nn.init.normal_(self.proj.weight, std=vt.proj_init_std)
        nn.init.zeros_(self.proj.bias)

    def _check_images(self, images: torch.Tensor) -> None:
        if not torch.is_tensor(images):
            raise TypeError(f"images must be a torch.Tensor [B, 3, H, W], got {type(images).__name__}")
        if images.dim() != 4:
            raise ValueError(
                f"images must have shape [B, 3, H, W], got {tuple(images.shape)}; for one image use images[None]"
            )
        if images.shape[1] != 3:
            raise ValueError(f"images must have 3 (RGB) channels in dim 1, got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(
                f"images must be floating point in [0, 1], got {images.dtype}; convert uint8 with images.float() / 255 "
                "or use preprocess_images()"
            )
        size = self.image_size
        if tuple(images.shape[-2:]) != (size, size):
            raise ValueError(
                f"images must be {size}x{size}, got {images.shape[-2]}x{images.shape[-1]}; resize / center-crop them "
                f"to {size}x{size} first (preprocess_images(images, {size}) does this)"
            )

    def add_position_embedding(self, feature_map: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] + the g x g sin-cos table resized bicubically to H x W."""
        _, channels, height, width = feature_map.shape
        table = resize_grid_embedding(self.pos_embed[1:], height, width)  # [H*W, C]
        return feature_map + table.T.reshape(channels, height, width).to(feature_map.dtype)

    def forward(self, images: torch.Tensor) -> VisualTokenizerOutput:
        """images [B, 3, S, S] floats in [0, 1] (RGB; values outside [0, 1] are used as given)."""
        self._check_images(images)
        pixels = (images.float() - self.clip_mean.float()) / self.clip_std.float()  # fp32 even in a bf16 model
        encoded = self.encoder(pixels.to(self.pos_proj.weight.dtype))
        last_hidden_state = encoded.last_hidden_state  # [B, 1 + g*g, C]
        tokens = self.pos_ln(self.pos_proj(last_hidden_state)) + self.pos_embed.to(last_hidden_state.dtype)
        vis_embed = self.proj(self.perceiver_resampler(self.post_ln(tokens)))  # [B, Q, llm_hidden]
        return VisualTokenizerOutput(
            vis_embed=vis_embed,
            multiscale_features=[self.add_position_embedding(f) for f in encoded.multiscale_features],
            last_hidden_state=last_hidden_state,
        )


ImageInput = Image.Image | torch.Tensor | Sequence[Image.Image]


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """The official inference transform: halve with BOX filtering while the short side is >= 2 * size, resize the
    short side to ``size`` (bicubic), then center-crop ``size`` x ``size``."""
    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def preprocess_images(images: ImageInput, image_size: int) -> torch.Tensor:
    """PIL image(s) or a uint8 tensor [3, H, W] / [B, 3, H, W] -> float32 [B, 3, S, S] in [0, 1].

    Images of another size are center-crop-resized as in the official inference pipeline.
    """
    if isinstance(images, Image.Image):
        images = [images]
    if torch.is_tensor(images):
        if images.dtype != torch.uint8 or images.dim() not in (3, 4) or images.shape[-3] != 3:
            raise ValueError(
                f"expected a uint8 tensor [3, H, W] or [B, 3, H, W], got {images.dtype} {tuple(images.shape)}"
            )
        batch = images if images.dim() == 4 else images[None]
        if tuple(batch.shape[-2:]) == (image_size, image_size):
            return batch.float() / 255
        images = [Image.fromarray(img.permute(1, 2, 0).cpu().numpy()) for img in batch]
    if not images or not all(isinstance(img, Image.Image) for img in images):
        raise TypeError("expected a PIL image, a non-empty list of PIL images, or a uint8 tensor")
    arrays = [np.asarray(center_crop_resize(img, image_size)) for img in images]  # [S, S, 3] uint8 each
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
