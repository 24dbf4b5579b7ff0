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


def test_the_throttle_bounds_what_previews_cost() -> None:
    now = [0.0]

    def steps(throttle: PreviewThrottle, preview_seconds: float, total: int = 10) -> list[int]:
        """Steps of 0.1 s each; a preview moves the clock by ``preview_seconds``; which steps got one."""

        def preview() -> str:
            now[0] += preview_seconds
            return "picture"

        taken = []
        for step in range(1, total + 1):
            now[0] += 0.1
            if throttle.take(ProgressEvent("image", step, total, preview=preview)) == "picture":
                taken.append(step)
        return taken

    assert steps(PreviewThrottle(0.25, clock=lambda: now[0]), 0.0) == [1, 4, 7, 10]  # four a second, and the last
    # slow previews (a big VAE's decode): at least ten times their cost apart, and no forced last one
    assert steps(PreviewThrottle(0.25, clock=lambda: now[0]), 0.3, total=40) == [1, 31]
    assert not PreviewThrottle(0.0).wants(ProgressEvent("text", 1, 5))  # no preview to give


def test_a_failing_preview_switches_previews_off_and_generation_goes_on(caplog) -> None:
    engine = InterleavedEngine.from_pretrained()
    throttle = PreviewThrottle(0.0)
    calls = []

    def broken() -> None:
        calls.append(1)
        raise RuntimeError("out of memory in the VAE")

    def hook(event) -> None:
        if event.phase == "image":
            throttle.take(ProgressEvent(event.phase, event.step, event.total, preview=broken))

    options = ImageOptions(num_inference_steps=4, seed=2)
    drawn = engine.generate_images(Interleaved(["a small red circle at top left."]), options, progress=hook)
    assert calls == [1] and throttle.failed  # tried once, then off
    assert "previews switched off for this generation" in caplog.text and "out of memory" in caplog.text
    plain = engine.generate_images(Interleaved(["a small red circle at top left."]), options)
    assert torch.equal(drawn.tensors, plain.tensors)


def test_a_diverged_sample_previews_black() -> None:
    from comfy_mm_interleaved.models.latent_preview import to_preview_image

    colours = torch.full((4, 4, 3), float("nan"))
    colours[0, 0] = torch.tensor([1.0, 0.5, 0.0])
    picture = to_preview_image(colours, size=8)
    assert (
        picture.size == (8, 8) and picture.getpixel((0, 0)) == (255, 128, 0) and picture.getpixel((7, 7)) == (0, 0, 0)
    )
