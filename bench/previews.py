"""What live previews cost: drawing images with a preview asked for at every diffusion step vs without, same run.

    python bench/previews.py [--model MODEL_DIR] [--steps 30] [--repeats 3] [--device cpu]

All paths draw the same images (same seeds): without previews, with a preview at every step (the worst case), and
throttled as the ComfyUI nodes do when ComfyUI runs with ``--preview-method`` other than ``none``
(``nodes/progress.py``: at most four a second and a tenth of the time). They alternate; the best time of each
counts. Prints which preview path the model's VAE takes (the fitted latent-to-RGB map, or a VAE decode).
"""

from __future__ import annotations

import argparse
import time

import torch

from comfy_mm_interleaved.inference import ImageOptions, Interleaved, InterleavedEngine
from comfy_mm_interleaved.inference.engine import LINEAR_PREVIEW_MAX_ERROR
from comfy_mm_interleaved.inference.progress import PreviewThrottle

PREVIEW_INTERVAL_S, PREVIEW_COST_FACTOR = 0.25, 10.0  # as nodes/progress.py (which needs ComfyUI to import)

PROMPTS = ["a large blue square at middle center.", "a small red circle at top left."]


def draw(engine: InterleavedEngine, steps: int, throttle: tuple[float, float] | None) -> tuple[float, torch.Tensor]:
    """Draw both prompts; ``throttle``: (interval, cost factor) of a ``PreviewThrottle`` (None: no previews)."""
    previews = None if throttle is None else PreviewThrottle(*throttle)

    def hook(event) -> None:
        if previews is not None:
            previews.take(event)

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
    args = parser.parse_args()
    engine = InterleavedEngine.from_pretrained(args.model, device=args.device)
    draw(engine, args.steps, (0.0, 0.0))  # warm-up, and fits the latent-to-RGB map once
    paths = {"no previews": None, "every step": (0.0, 0.0), "as the nodes": (PREVIEW_INTERVAL_S, PREVIEW_COST_FACTOR)}
    best = dict.fromkeys(paths, float("inf"))
    reference = None
    for _ in range(args.repeats):
        for name, throttle in paths.items():
            seconds, images = draw(engine, args.steps, throttle)
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
