"""A cheap RGB preview of diffusion latents: a linear map from latent channels to colour, fitted once per VAE.

ComfyUI previews its samplers with fixed per-model factors ("latent2rgb"). The decoders here differ (the release's
SD-2.1 VAE, the embedded model's own small VAE), so the map is fitted to the VAE at hand instead: synthetic images
(shapes of random colours on plain backgrounds, half of them black) are encoded, and the least-squares affine map
from each latent pixel to the mean colour of the image pixels it covers is kept. The VAE is convolutional, so the
fit runs at a small size whatever the model's image size. A preview then costs one small matrix product, no VAE
decode; like ComfyUI's latent2rgb it is a rough picture (colours and layout), not the final image.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

CALIBRATION_IMAGES = 48
CALIBRATION_SIZE = 64  # pixels (at most the model's image size)


def calibration_images(count: int = CALIBRATION_IMAGES, size: int = CALIBRATION_SIZE, seed: int = 0) -> torch.Tensor:
    """[count, 3, size, size] in [-1, 1]: one to three ellipses or rectangles of random colours on a black or
    random plain background (the same images for the same arguments)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        background = (0, 0, 0) if rng.random() < 0.5 else tuple(int(v) for v in rng.integers(0, 256, 3))
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 4))):
            x, y = (int(v) for v in rng.integers(0, size - size // 8, 2))
            w, h = (int(v) for v in rng.integers(size // 10, size // 2, 2))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x, y, x + w, y + h], fill=colour)
        images.append(np.asarray(image))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def _pixels(latents: torch.Tensor) -> torch.Tensor:
    """[N, C, h, w] -> [N*h*w, C + 1] (float64, with a column of ones for the bias)."""
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).double().cpu()
    return torch.cat([flat, torch.ones(len(flat), 1, dtype=torch.float64)], dim=1)


class LatentToRGB:
    """``weight`` [C_lat, 3] and ``bias`` [3]: scaled latents (as the sampler holds them) -> colours in [0, 1].
    ``error``: its mean absolute colour error on calibration images it was not fitted on (0 to 1)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, error: float = float("nan")) -> None:
        self.weight = weight.float().cpu()
        self.bias = bias.float().cpu()
        self.error = error

    @classmethod
    @torch.no_grad()
    def fit(cls, decoder: torch.nn.Module, image_size: int) -> LatentToRGB:
        """Fit to ``decoder`` (a ``StableDiffusionMMFS``: ``encode`` and ``scaling_factor``) on two thirds of the
        calibration images; the rest measure ``error``."""
        images = calibration_images(size=min(image_size, CALIBRATION_SIZE)).to(decoder.vae.device)
        mean, _ = decoder.encode(images)
        latents = mean.float() * decoder.scaling_factor  # [N, C, h, w]
        colours = F.adaptive_avg_pool2d((images.float() + 1) / 2, latents.shape[-2:])  # [N, 3, h, w]
        targets = colours.permute(0, 2, 3, 1).reshape(len(images), -1, 3).double().cpu()  # [N, h*w, 3]
        split = 2 * len(images) // 3
        solution = torch.linalg.lstsq(_pixels(latents[:split]), targets[:split].reshape(-1, 3)).solution
        predicted = (_pixels(latents[split:]) @ solution).clamp(0, 1)
        error = (predicted - targets[split:].reshape(-1, 3)).abs().mean().item()
        return cls(solution[:-1], solution[-1], error)

    def colours(self, latents: torch.Tensor) -> torch.Tensor:
        """[C, h, w] or [B, C, h, w] (the first is used) -> [h, w, 3] in [0, 1]."""
        if latents.dim() == 4:
            latents = latents[0]
        flat = latents.detach().float().cpu().permute(1, 2, 0)  # [h, w, C]
        return (flat @ self.weight + self.bias).clamp(0, 1)

    def image(self, latents: torch.Tensor, size: int | None = None) -> Image.Image:
        """The preview as a PIL image, enlarged (nearest) to about ``size`` pixels on its longer side."""
        return to_preview_image(self.colours(latents), size)


def to_preview_image(colours: torch.Tensor, size: int | None = None) -> Image.Image:
    """[h, w, 3] in [0, 1] -> PIL image, enlarged (nearest) by a whole factor to about ``size`` pixels."""
    colours = torch.nan_to_num(colours.float().cpu(), nan=0.0).clamp(0, 1)  # a diverged sample shows black
    image = Image.fromarray((colours.numpy() * 255 + 0.5).astype(np.uint8))
    if size is not None and max(image.size) < size:
        factor = max(1, size // max(image.size))
        image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    return image
