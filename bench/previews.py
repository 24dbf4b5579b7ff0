"""What live previews cost: drawing images with a preview asked for at every diffusion step vs without, same run.

    python bench/previews.py [--model MODEL_DIR] [--steps 30] [--repeats 3] [--device cpu] [--interval 0.25]

All paths draw the same images (same seeds): without previews, with a preview at every step (the worst case), and
throttled as the ComfyUI nodes do when ComfyUI runs with ``--preview-method`` other than ``none`` (at most one per
interval, always the last step). They alternate; the best time of each counts. Prints which preview path the
model's VAE takes (the fitted latent-to-RGB map, or a VAE decode).
"""

from __future__ import annotations

import argparse
import time

import torch

from comfy_mm_interleaved.inference import ImageOptions, Interleaved, InterleavedEngine
from comfy_mm_interleaved.inference.engine import LINEAR_PREVIEW_MAX_ERROR
from comfy_mm_interleaved.inference.progress import PreviewThrottle

PROMPTS = ["a large blue square at middle center.", "a small red circle at top left."]


def draw(engine: InterleavedEngine, steps: int, interval: float | None) -> tuple[float, torch.Tensor]:
    """Draw both prompts; ``interval``: previews throttled as the nodes do (None: no previews)."""
    throttle = PreviewThrottle(interval or 0.0)

    def hook(event) -> None:
        if interval is not None and throttle.wants(event):
            event.preview()

    start = time.perf_counter()
    tensors = [
        engine.generate_images(Interleaved([p]), ImageOptions(num_inference_steps=steps, seed=i), progress=hook).tensors
        for i, p in enumerate(PROMPTS)
    ]
    return time.perf_counter() - start, torch.cat(tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--interval", type=float, default=0.25, help="the nodes' preview interval (s)")
    args = parser.parse_args()
    engine = InterleavedEngine.from_pretrained(args.model, device=args.device)
    draw(engine, args.steps, 0.0)  # warm-up, and fits the latent-to-RGB map once
    paths = {"no previews": None, "every step": 0.0, f"every {args.interval:g} s": args.interval}
    best = dict.fromkeys(paths, float("inf"))
    reference = None
    for _ in range(args.repeats):
        for name, interval in paths.items():
            seconds, images = draw(engine, args.steps, interval)
            best[name] = min(best[name], seconds)
            reference = images if reference is None else reference
            assert torch.equal(images, reference), "previews changed the images"
    fitted = engine._latent_to_rgb
    path = "latent-to-RGB map" if fitted.error <= LINEAR_PREVIEW_MAX_ERROR else "VAE decode"
    print(f"map colour error {fitted.error:.3f} (limit {LINEAR_PREVIEW_MAX_ERROR}): previews by {path}")
    print(f"{'':<16}{'s / image':>10}{'ratio':>8}")
    for name, seconds in best.items():
        print(f"{name:<16}{seconds / len(PROMPTS):>10.3f}{seconds / best['no previews']:>7.2f}x")


if __name__ == "__main__":
    main()
