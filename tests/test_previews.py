"""Live previews of the image being drawn: the latent-to-RGB map fitted to a VAE, and the engine's per-step
pictures (the map where it is faithful, else a VAE decode)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from comfy_mm_interleaved.inference import ImageOptions, Interleaved, InterleavedEngine
from comfy_mm_interleaved.inference.engine import LINEAR_PREVIEW_MAX_ERROR
from comfy_mm_interleaved.inference.progress import PreviewThrottle, ProgressEvent
from comfy_mm_interleaved.models.latent_preview import LatentToRGB, calibration_images

MIXING = torch.tensor([[0.9, -0.4, 0.2, 0.1], [0.3, 0.8, -0.5, 0.2], [-0.2, 0.1, 0.7, -0.6]])  # RGB -> 4 channels


class LinearVAE:
    """A stand-in VAE whose latents are an exact affine function of the colours (SD's VAE is close to one)."""

    scaling_factor = 0.5

    vae = type("Device", (), {"device": torch.device("cpu")})()  # where the fitting code puts its images

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        colours = F.avg_pool2d((images + 1) / 2, 8)  # [N, 3, h, w] in [0, 1]
        latents = torch.einsum("nchw,cl->nlhw", colours, MIXING) + 0.25
        return latents / self.scaling_factor, torch.zeros_like(latents)


def test_the_map_recovers_an_affine_vae_and_measures_its_own_error() -> None:
    images = calibration_images(count=6, size=32, seed=3)
    assert images.shape == (6, 3, 32, 32) and float(images.min()) >= -1 and float(images.max()) <= 1
    assert torch.equal(images, calibration_images(count=6, size=32, seed=3))  # the same images every time
    fitted = LatentToRGB.fit(LinearVAE(), 512)
    assert fitted.error < 1e-4
    colours = torch.rand(3, 8, 8)
    latents = (torch.einsum("chw,cl->lhw", colours, MIXING) + 0.25)[None]
    assert torch.allclose(fitted.colours(latents), colours.permute(1, 2, 0), atol=1e-4)
    picture = fitted.image(latents, size=64)
    assert picture.size == (64, 64) and picture.getpixel((0, 0)) == tuple(
        int(v * 255 + 0.5) for v in colours[:, 0, 0].tolist()
    )


def test_engine_previews_follow_the_sampler_and_end_at_the_drawn_image() -> None:
    engine = InterleavedEngine.from_pretrained()  # the embedded model: its small VAE is far from linear
    pictures = []
    calls = []

    def hook(event) -> None:
        calls.append((event.phase, event.step))
        if event.phase == "image":
            assert event.preview is not None
            if event.step in (1, event.total // 2, event.total):
                pictures.append(np.asarray(event.preview()).astype(np.float64) / 255)
        else:
            assert event.preview is None

    options = ImageOptions(num_inference_steps=12, seed=4)
    result = engine.generate_images(Interleaved(["a large blue square at middle center."]), options, progress=hook)
    assert engine._latent_to_rgb.error > LINEAR_PREVIEW_MAX_ERROR  # so the previews come from the VAE decoder
    final = np.asarray(result.images[0]).astype(np.float64) / 255
    errors = [np.abs(picture - final).mean() for picture in pictures]
    assert errors[-1] < 0.01 and errors[0] > errors[-1]  # the first step is still mostly noise
    assert [s for p, s in calls if p == "image"] == list(range(1, 13))
    # asking for no preview costs nothing and changes nothing
    again = engine.generate_images(Interleaved(["a large blue square at middle center."]), options)
    assert torch.equal(again.tensors, result.tensors)


def test_the_throttle_lets_a_preview_through_per_interval_and_always_the_last_step() -> None:
    now = [0.0]
    throttle = PreviewThrottle(0.25, clock=lambda: now[0])
    wanted = []
    for step in range(1, 11):  # a step every 0.1 s
        now[0] = step * 0.1
        wanted.append(throttle.wants(ProgressEvent("image", step, 10, preview=lambda: None)))
    assert [s for s, w in zip(range(1, 11), wanted) if w] == [1, 4, 7, 10]
    assert not PreviewThrottle(0.0).wants(ProgressEvent("text", 1, 5))  # no preview to give
