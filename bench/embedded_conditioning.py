"""Where the embedded model's text-to-image conditioning loses the prompt (a diagnostic for ShapeStories models).

Two measurements, printed as tables (docs/BENCHMARKS.md, "embedded model"):

``--layers``: for 54 prompts ``a small {colour} {shape} at {row} {column}.`` (6 colours x 3 shapes x 3 cells), the
share of the hidden states' energy that each attribute explains (between-class energy / total energy) after every
LLM layer (through the final RMSNorm), over all context rows and at the <BOI> row, plus the same for the 77 prompt
embeddings the UNet reads. 1.0 = the features are the attribute; 0.0 = they ignore it.

``--oracle STEPS``: the model's UNet (+ MMFSNet, VAE) trained for STEPS steps of 32 rendered images with clean
conditioning instead of the LLM's (one learned token per attribute value, padded to 77), then 48 images sampled
(DDIM 25, guidance 1) and scored on the ShapeStories rules: what the image side learns once the prompt reaches it.

``--sensitivity``: how far each LLM layer's output at each position of ``a large red circle at top left. <BOI>``
moves (|delta| / |state|) when one word of the prompt is swapped (the column, the row, the colour, the shape): which
positions carry which word to the decoder, which reads the states up to <BOI>.

    python bench/embedded_conditioning.py --model comfy_mm_interleaved/embedded --layers --sensitivity --oracle 300
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from comfy_mm_interleaved.inference import ImageOptions, Interleaved, InterleavedEngine
from comfy_mm_interleaved.shapestories.generate import random_attributes
from comfy_mm_interleaved.shapestories.render import render_array
from comfy_mm_interleaved.shapestories.rules import COLOURS, COLUMNS, ROWS, SHAPES, SIZES, Attributes
from comfy_mm_interleaved.shapestories.score import attribute_matches, read_image

CELLS = (("top", "left"), ("middle", "center"), ("bottom", "right"))
PROMPTS = [(c, s, cell) for c in COLOURS for s in SHAPES for cell in CELLS]


def energy_share(x: torch.Tensor, labels: torch.Tensor) -> float:
    """Between-class energy of ``x`` [n, ...] over its total energy (mean squared norm)."""
    flat = x.flatten(1).double()
    means = torch.stack([flat[labels == k].mean(0) for k in labels.unique()])
    between = (means - flat.mean(0)).pow(2).sum(1).mean()
    return float(between / flat.pow(2).sum(1).mean())


def layer_table(engine: InterleavedEngine) -> list[tuple[str, dict[str, float], dict[str, float]]]:
    model = engine.model
    layers = model.mm_decoder.layers
    per_layer: dict[int, list[torch.Tensor]] = {k: [] for k in range(len(layers))}
    prompts: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda _m, _a, out, k=k: per_layer[k].append(model.mm_decoder.norm(out)[0]))
        for k, layer in enumerate(layers)
    ]
    hooks.append(
        model.image_decoder.perceiver_resampler.register_forward_hook(lambda _m, _a, out: prompts.append(out[0]))
    )
    try:
        for colour, shape, (row, column) in PROMPTS:
            engine.clear_cache()
            doc = Interleaved.from_list([{"text": f"a small {colour} {shape} at {row} {column}."}])
            engine.generate_images(doc, ImageOptions(num_inference_steps=1))
    finally:
        for hook in hooks:
            hook.remove()
    labels = {
        "colour": torch.tensor([COLOURS.index(c) for c, _, _ in PROMPTS]),
        "shape": torch.tensor([SHAPES.index(s) for _, s, _ in PROMPTS]),
        "position": torch.tensor([CELLS.index(cell) for _, _, cell in PROMPTS]),
    }
    rows = []
    for k, states in per_layer.items():
        x = torch.stack([s.detach() for s in states])  # [54, L, D]
        rows.append(
            (
                f"LLM layer {k + 1}",
                {n: energy_share(x, lab) for n, lab in labels.items()},
                {n: energy_share(x[:, -1], lab) for n, lab in labels.items()},
            )
        )
    embeds = torch.stack([p.detach() for p in prompts])
    rows.append(("77 prompt embeddings", {n: energy_share(embeds, lab) for n, lab in labels.items()}, {}))
    return rows


def oracle(engine: InterleavedEngine, steps: int, batch: int = 32, seed: int = 0) -> dict[str, float]:
    image_decoder = engine.model.image_decoder
    decoder = image_decoder.decoder
    torch.manual_seed(seed)
    width = image_decoder.neg_prompt_embeds.shape[-1]
    length = image_decoder.config.prompt_length
    vocab = {"colour": COLOURS, "shape": SHAPES, "size": SIZES, "row": ROWS, "column": COLUMNS}
    tables = nn.ModuleDict({name: nn.Embedding(len(values), width) for name, values in vocab.items()})

    def condition(attributes: list[Attributes]) -> torch.Tensor:  # [B, 77, D]: one token per attribute
        tokens = [
            tables[name](torch.tensor([values.index(getattr(a, name)) for a in attributes]))
            for name, values in vocab.items()
        ]
        stacked = torch.stack(tokens, 1)
        return torch.cat([stacked, stacked.new_zeros(len(attributes), length - len(tokens), width)], 1)

    size = image_decoder.config.image_size
    scheduler = decoder.noise_scheduler
    params = [*decoder.unet.parameters(), *tables.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    no_source = image_decoder.prepare_mmfs(None, torch.zeros(batch, 1, dtype=torch.long))
    rng = np.random.default_rng(seed + 1)
    decoder.unet.train()
    for _ in range(steps):
        attributes = [random_attributes(rng) for _ in range(batch)]
        images = torch.from_numpy(np.stack([render_array(a, size) for a in attributes])).permute(0, 3, 1, 2)
        with torch.no_grad():
            mean, std = decoder.encode(images.float() / 127.5 - 1)
            latents = (mean + std * torch.randn_like(std)) * decoder.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction = decoder.denoise(noisy, timesteps, condition(attributes), no_source)
        loss = (prediction - scheduler.get_velocity(latents, noise, timesteps)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    decoder.unet.eval()
    rng = np.random.default_rng(seed + 99)
    attributes = [random_attributes(rng) for _ in range(48)]
    with torch.no_grad():
        images = image_decoder.sample(
            condition(attributes),
            None,
            torch.zeros(48, 1, dtype=torch.long),
            num_inference_steps=25,
            guidance_scale=1.0,
            scheduler="ddim",
            generator=torch.Generator().manual_seed(seed),
        )
    tally = {"colour": 0, "shape": 0, "size": 0, "position": 0, "all four": 0}
    for a, image in zip(attributes, images):
        pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        expected = {"colour": a.colour, "shape": a.shape, "size": a.size, "position": f"{a.row} {a.column}"}
        matches = attribute_matches(read_image(pixels), expected)
        for name, right in matches.items():
            tally[name] += right
        tally["all four"] += all(matches.values())
    return {name: count / len(attributes) for name, count in tally.items()}


SWAPS = {
    "column": "a large red circle at top right.",
    "row": "a large red circle at bottom left.",
    "colour": "a large blue circle at top left.",
    "shape": "a large red square at top left.",
}


def sensitivity_table(engine: InterleavedEngine) -> dict[str, list[list[float]]]:
    """Per swapped word: per LLM layer, |delta state| / |state| at every position of the base prompt."""
    layers = engine.model.mm_decoder.layers
    captured: dict[int, torch.Tensor] = {}

    def hook_for(k: int):
        def hook(_module, _args, out) -> None:
            captured.setdefault(k, (out[0] if isinstance(out, tuple) else out)[0].detach().clone())

        return hook

    def states(text: str) -> dict[int, torch.Tensor]:
        captured.clear()
        engine.clear_cache()
        engine.generate_images(Interleaved.from_list([{"text": text}]), ImageOptions(num_inference_steps=1))
        return dict(captured)

    hooks = [layer.register_forward_hook(hook_for(k)) for k, layer in enumerate(layers)]
    try:
        base = states("a large red circle at top left.")
        table = {}
        for word, text in SWAPS.items():
            other = states(text)
            table[word] = [
                ((other[k] - base[k]).norm(dim=-1) / base[k].norm(dim=-1)).tolist() for k in range(len(layers))
            ]
    finally:
        for hook in hooks:
            hook.remove()
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the embedded model)")
    parser.add_argument("--layers", action="store_true", help="attribute energy per LLM layer and in the prompt")
    parser.add_argument("--oracle", type=int, default=0, metavar="STEPS", help="UNet trained on clean conditioning")
    parser.add_argument("--sensitivity", action="store_true", help="which positions move when one word is swapped")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("MMI_NUM_THREADS", "1")))
    engine = InterleavedEngine.from_pretrained(args.model, device="cpu")
    if args.layers:
        print("share of the hidden states' energy explained by each attribute (54 prompts)")
        print(f"{'features':<22}{'colour':>8}{'shape':>8}{'position':>10}   at <BOI>: colour  shape  position")
        for name, rows, boi in layer_table(engine):
            at_boi = "".join(f"{boi[k]:>7.4f}" for k in ("colour", "shape", "position")) if boi else ""
            print(f"{name:<22}{rows['colour']:>8.4f}{rows['shape']:>8.4f}{rows['position']:>10.4f}   {at_boi}")
    if args.sensitivity:
        words = "<s> a large red circle at top left . <BOI>".split()
        print("|delta| / |state| of each LLM layer's output per position when one word is swapped")
        print(f"{'swap':<8}{'layer':>6}  " + "".join(f"{w:>8}" for w in words))
        for word, per_layer in sensitivity_table(engine).items():
            for k, values in enumerate(per_layer):
                print(f"{word:<8}{k + 1:>6}  " + "".join(f"{v:>8.3f}" for v in values))
    if args.oracle:
        start = time.perf_counter()
        scores = oracle(engine, args.oracle)
        summary = ", ".join(f"{k} {v:.0%}" for k, v in scores.items())
        seconds = time.perf_counter() - start
        print(f"UNet on clean attribute conditioning, {args.oracle} steps x 32 images ({seconds:.0f} s): {summary}")


if __name__ == "__main__":
    main()
