"""Interleaved generation: our engine vs the official loop's recomputation, same model, same story, same run.

    python bench/generate.py [--golden ../shared/golden] [--segments 4] [--tokens 32] [--steps 30] [--repeats 2]
    python bench/generate.py --estimate-13b                  # memory plan of the 13B model in bf16 (meta build)
    python bench/generate.py --gpu-13b [--offload sequential] [--budget-gib 22]    # measured on a GPU

Story: a prompt text and an image, then ``--segments`` times (``--tokens`` greedy tokens of text, then an image of
``--steps`` DDPM steps with guidance 7.5). Both engines run the same tiny official-config model (the golden tiny
checkpoint, converted) on the CPU and must produce the same tokens and images.

* ours: ``InterleavedEngine`` with every cache on (image features by pixel hash, per-layer MMFS values, the
  document's KV cache extended step by step, diffusion components built once).
* baseline: what the official ``inference.py`` loop does, on the same code: every step re-encodes every image of
  the context (plus the gray placeholder of the image being drawn), re-runs the whole context through the LLM, keeps
  a KV cache only inside one text call, re-projects every image's MMFS values at every token and the source image's
  UNet-side MMFS values at every diffusion step, and reloads the diffusion components' weights from disk for every
  image (the official code rebuilds its ``DiffusionPipeline``).

``--gpu-13b`` builds the 13B configuration with random bf16 weights (about 30 GB of host memory, no download) and
runs a short interleaved story (text, image, text) on the GPU with the chosen offload, reporting the measured peak
(``torch.cuda.max_memory_allocated``) per phase next to the meta-device estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from comfy_mm_interleaved.checkpoint import load_state_dict_from_folder  # noqa: E402
from comfy_mm_interleaved.config import MMInterleavedConfig  # noqa: E402
from comfy_mm_interleaved.convert import convert_official  # noqa: E402
from comfy_mm_interleaved.inference import (  # noqa: E402
    CachePolicy,
    ImageOptions,
    Interleaved,
    InterleavedEngine,
    TextOptions,
)
from comfy_mm_interleaved.inference.memory import GIB, estimate_peaks, resolve_placement  # noqa: E402
from comfy_mm_interleaved.tokenizer import build_word_tokenizer  # noqa: E402

DIFFUSION_COMPONENTS = ["image_decoder", "unet", "unet_mmfs", "vae"]
# "cpu": this process's CPU time (with one torch thread, the work done, unaffected by other jobs on a shared box)
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def word_tokenizer(config: MMInterleavedConfig):
    """A tokenizer in which the word ``w<i>`` is token id ``i`` (every ordinary id of the vocabulary)."""
    tokens = config.special_tokens
    fixed = {0, tokens.bos_token_id, tokens.eos_token_id, tokens.pad_token_id}
    return build_word_tokenizer(
        [f"w{i}" for i in range(config.orig_vocab_size) if i not in fixed], tokens, config.orig_vocab_size
    )


def tiny_model_dir(golden: Path, folder: Path) -> Path:
    """The golden tiny release converted to our format, with a word tokenizer in ``tokenizer/``."""
    model = convert_official(
        golden / "mm_interleaved_pretrain_tiny", folder / "model", config=golden / "tiny_config.json"
    )
    word_tokenizer(MMInterleavedConfig.from_official_tiny(golden / "tiny_config.json")).save_pretrained(
        str(model / "tokenizer")
    )
    return model


class OfficialLoop(InterleavedEngine):
    """The baseline: the official loop's recomputation (see the module docstring) on the same engine code."""

    def __init__(self, model_dir: Path) -> None:
        loaded = InterleavedEngine.from_pretrained(model_dir, device="cpu", caching=CachePolicy.official())
        super().__init__(loaded.model, loaded.tokenizer, placement=loaded.placement, caching=loaded.caching)
        self.model_dir = model_dir

    def generate_images(self, doc, options=None, progress=None, *, noise=None):
        weights = load_state_dict_from_folder(self.model_dir, DIFFUSION_COMPONENTS)  # rebuilt from disk
        self.model.image_decoder.load_state_dict({k.removeprefix("image_decoder."): v for k, v in weights.items()})
        size = self.config.visual_tokenizer.encoder.image_size
        self.encode_images(Image.new("RGB", (size, size), (128, 128, 128)))  # the official gray placeholder
        return super().generate_images(doc, options, progress, noise=noise)

    def _sample(self, condition, options, progress, noise):
        """The official MMFSNet projects the source image's values inside every UNet call (CFG batch of 2)."""
        decoder = self.model.image_decoder
        device, dtype = self._device("diffusion"), decoder.neg_prompt_embeds.dtype
        features = [f.to(device, dtype).expand(2, -1, -1, -1) for f in condition["mmfs_features"]]
        mask = condition["mmfs_mask"].to(device).expand(2, -1)

        def every_step(event) -> None:
            decoder.prepare_mmfs(features, mask)
            if progress is not None:
                progress(event)

        return super()._sample(condition, options, every_step, noise)


def story_start(config: MMInterleavedConfig) -> Interleaved:
    pixels = torch.linspace(0, 255, 96 * 96 * 3).reshape(96, 96, 3).to(torch.uint8).numpy()
    return Interleaved(["w11 w12 w13 w14 w15 w16 w17 w18", Image.fromarray(pixels)])


def run_story(engine: InterleavedEngine, args: argparse.Namespace) -> dict:
    doc = story_start(engine.config)
    text_options = TextOptions(max_new_tokens=args.tokens, min_new_tokens=args.tokens, stop_on_image=False)
    image_options = ImageOptions(num_inference_steps=args.steps, guidance_scale=7.5, seed=42)
    clock = CLOCKS[args.clock]
    text_seconds = image_seconds = 0.0
    tokens, images = [], []
    start = clock()
    for _ in range(args.segments):
        begin = clock()
        result = engine.generate_text(doc, text_options)
        text_seconds += clock() - begin
        tokens.append(result.token_ids)
        begin = clock()
        drawn = engine.generate_images(result.document, image_options)
        image_seconds += clock() - begin
        images.append(drawn.tensors)
        doc = drawn.document
    total = clock() - start
    return {
        "seconds": total,
        "text_seconds": text_seconds,
        "image_seconds": image_seconds,
        "tokens_per_second": sum(map(len, tokens)) / text_seconds,
        "seconds_per_image": image_seconds / args.segments,
        "images_encoded": engine.stats.images_encoded,
        "llm_positions": engine.stats.llm_tokens,
        "tokens": tokens,
        "images": torch.cat(images),
    }


def bench_cpu(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = tiny_model_dir(args.golden, Path(tmp))
        best: dict[str, dict] = {}
        for _ in range(args.repeats):  # alternate, keep each engine's best run
            for name, make in (("ours", lambda: InterleavedEngine.from_pretrained(model_dir, device="cpu")),
                               ("baseline", lambda: OfficialLoop(model_dir))):  # fmt: skip
                run = run_story(make(), args)
                if name not in best or run["seconds"] < best[name]["seconds"]:
                    best[name] = run
    ours, base = best["ours"], best["baseline"]
    if ours["tokens"] != base["tokens"]:
        raise SystemExit("ours and the baseline generated different tokens")
    image_diff = [float((a - b).abs().max()) for a, b in zip(ours["images"], base["images"])]
    print(f"story: prompt + 1 image, then {args.segments} x ({args.tokens} tokens + 1 image, {args.steps} DDPM steps)")
    print(f"times: {args.clock} seconds, {args.threads} torch thread(s), best of {args.repeats}")
    print(f"{'engine':<10}{'end-to-end s':>14}{'text s':>9}{'tokens/s':>10}{'image s':>9}{'s/image':>9}"
          f"{'encodes':>9}{'LLM pos.':>10}")  # fmt: skip
    for name, run in (("ours", ours), ("baseline", base)):
        print(f"{name:<10}{run['seconds']:>14.2f}{run['text_seconds']:>9.2f}{run['tokens_per_second']:>10.1f}"
              f"{run['image_seconds']:>9.2f}{run['seconds_per_image']:>9.3f}{run['images_encoded']:>9}"
              f"{run['llm_positions']:>10}")  # fmt: skip
    ratios = {
        "end_to_end": base["seconds"] / ours["seconds"],
        "text": base["text_seconds"] / ours["text_seconds"],
        "image": base["image_seconds"] / ours["image_seconds"],
    }
    print(
        f"speed-up: end to end {ratios['end_to_end']:.2f}x, text {ratios['text']:.2f}x, images {ratios['image']:.2f}x"
        "; same tokens"
    )
    # each drawn image goes back into the context as 8-bit pixels, so float-level differences of the two paths
    # (~1e-6) can flip a rounding and grow from image to image; the first image shows the numerical agreement
    print("max |ours - baseline| per image: " + ", ".join(f"{d:.1e}" for d in image_diff))
    drop = ("tokens", "images")
    return {
        "ours": {k: v for k, v in ours.items() if k not in drop},
        "baseline": {k: v for k, v in base.items() if k not in drop},
        "ratios": ratios,
        "image_max_abs_diff_per_image": image_diff,
    }


# ----------------------------------------------------------------------------------------------------------------
def estimate_13b(budget_gib: float) -> dict:
    estimate = estimate_peaks(MMInterleavedConfig.official_13b(), "bfloat16", int(budget_gib * GIB))
    print(f"13B in bfloat16 (meta-device build; VAE and fixed tables float32), budget {budget_gib} GiB")
    for name, size in estimate["component_bytes"].items():
        print(f"  {name:<18}{size / GIB:>8.2f} GiB")
    for name, size in estimate["runtime_bytes"].items():
        print(f"  runtime {name:<26}{size / GIB:>8.3f} GiB")
    for mode, size in estimate["peak_bytes"].items():
        print(f"  peak with offload={mode:<12}{size / GIB:>8.2f} GiB")
    print(
        f"  sequential: {estimate['sequential_resident_layers']} of {estimate['llm_layers']} LLM layers resident, "
        f"{estimate['streamed_bytes_per_token'] / GIB:.2f} GiB streamed per LLM forward"
    )
    return estimate


def random_13b_engine(args: argparse.Namespace) -> InterleavedEngine:
    """The 13B model with random weights in host memory (bf16; VAE float32), wrapped with the requested placement."""
    from comfy_mm_interleaved.checkpoint import build_empty_model

    config = MMInterleavedConfig.official_13b()
    if args.size == "tiny":  # a CPU smoke test of this path
        config = MMInterleavedConfig.from_official_tiny(args.golden / "tiny_config.json")
    model = build_empty_model(config)  # parameters on the meta device, buffers real
    generator = torch.Generator().manual_seed(0)
    for name, param in list(model.named_parameters()):
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        dtype = torch.float32 if name.startswith("image_decoder.decoder.vae.") else torch.bfloat16
        value = torch.empty(param.shape, dtype=dtype)
        if "norm" in name or name.endswith("ln.weight"):
            value.fill_(1.0)
        else:
            value.normal_(0.0, 0.02, generator=generator)
        setattr(module, attr, torch.nn.Parameter(value, requires_grad=False))
    placement = resolve_placement("bfloat16", args.device, args.offload)
    budget = int(args.budget_gib * GIB) if args.budget_gib else None
    if placement.offload == "none":
        model.to(args.device)
    return InterleavedEngine(model.eval(), word_tokenizer(config), placement=placement, offload_budget_bytes=budget)


def gpu_13b(args: argparse.Namespace) -> dict:
    begin = time.perf_counter()
    engine = random_13b_engine(args)
    built = time.perf_counter() - begin
    doc = story_start(engine.config)
    timings = {}
    begin = time.perf_counter()
    doc = engine.generate_text(doc, TextOptions(max_new_tokens=16, min_new_tokens=16, stop_on_image=False)).document
    timings["text_16_tokens_s"] = time.perf_counter() - begin
    begin = time.perf_counter()
    doc = engine.generate_images(doc, ImageOptions(num_inference_steps=args.steps)).document
    timings["image_s"] = time.perf_counter() - begin
    begin = time.perf_counter()
    engine.generate_text(doc, TextOptions(max_new_tokens=8, min_new_tokens=8, stop_on_image=False))
    timings["text_8_tokens_after_image_s"] = time.perf_counter() - begin
    report = engine.memory_report()
    placement = engine.placement
    print(f"{args.size} random bf16, offload={placement.offload}, resident layers {placement.resident_layers}")
    print(f"build {built:.0f} s; " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    for phase, devices in report["cuda_peak_per_phase"].items():
        for device, peaks in devices.items():
            print(f"  {phase:<8}{device:<8} allocated {peaks['allocated'] / GIB:6.2f} GiB"
                  f"  reserved {peaks['reserved'] / GIB:6.2f} GiB")  # fmt: skip
    return {"timings": timings, "memory": report, "build_seconds": built}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--golden", type=Path, default=Path(os.environ.get("MMI_GOLDEN_DIR", REPO.parent / "shared/golden"))
    )
    parser.add_argument("--segments", type=int, default=4, help="images of the story")
    parser.add_argument("--tokens", type=int, default=32, help="text tokens before each image")
    parser.add_argument("--steps", type=int, default=30, help="DDPM steps per image (official demo: 30)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="cpu: process CPU time (shared box)")
    parser.add_argument("--estimate-13b", action="store_true")
    parser.add_argument("--gpu-13b", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="13b", choices=["13b", "tiny"], help="--gpu-13b model (tiny: smoke test)")
    parser.add_argument("--offload", default="sequential", choices=["none", "model", "sequential"])
    parser.add_argument("--budget-gib", type=float, default=22.0, help="device memory the weights may use")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args()
    if args.estimate_13b:
        result = estimate_13b(args.budget_gib)
    elif args.gpu_13b:
        result = gpu_13b(args)
    else:
        result = bench_cpu(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
