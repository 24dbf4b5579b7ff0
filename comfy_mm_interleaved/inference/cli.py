"""``generate`` subcommand: continue interleaved documents from a JSON / JSONL file.

    python -m comfy_mm_interleaved generate [--model DIR] --input DOC.json|DOCS.jsonl --out DIR \\
        [--mode text|image|auto] [--seed N] [sampling and diffusion options]

Writes ``<out>/doc-00000.json``, ``doc-00001.json``, ... (input order; each the input segments followed by the
generated ones, images as PNG beside it referenced by relative path) and ``<out>/report.json`` (timings, tokens/s,
s/image, peak memory, options). Without ``--mode``, an official annotation entry's ``generate_mode`` / ``num_iter``
are honoured (``generate_images`` asks for an image first), else ``auto``. A progress bar goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SCHEDULER_CHOICES = ["ddpm", "ddim", "euler", "euler_ancestral", "dpmpp_2m"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the embedded model)")
    parser.add_argument("--input", type=Path, required=True, help="DOC.json, DOCS.jsonl or an official annt.json")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--mode", choices=["text", "image", "auto"], default=None, help="default: auto")
    parser.add_argument("--max-segments", type=int, default=None, help="auto mode: generation steps (default 4)")
    parser.add_argument("--seed", type=int, default=None, help="seed of text sampling and of the images")
    parser.add_argument("--force-image-after-text", action="store_true", help="auto: an image after every text")
    text = parser.add_argument_group("text")
    text.add_argument("--max-new-tokens", type=int, default=64)
    text.add_argument("--min-new-tokens", type=int, default=0)
    text.add_argument("--do-sample", action="store_true", help="sample instead of greedy / beam search")
    text.add_argument("--temperature", type=float, default=1.0)
    text.add_argument("--top-k", type=int, default=0)
    text.add_argument("--top-p", type=float, default=1.0)
    text.add_argument("--repetition-penalty", type=float, default=1.0)
    text.add_argument("--num-beams", type=int, default=1)
    text.add_argument("--no-stop-on-image", action="store_true", help="never start an image (text only)")
    image = parser.add_argument_group("image")
    image.add_argument("--steps", type=int, default=30, help="diffusion steps")
    image.add_argument("--guidance-scale", type=float, default=7.5)
    image.add_argument("--scheduler", choices=SCHEDULER_CHOICES, default="ddpm")
    image.add_argument("--num-images", type=int, default=1, help="samples per image step (the first is kept)")
    memory = parser.add_argument_group("memory")
    memory.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    memory.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    memory.add_argument("--offload", choices=["none", "model", "sequential"], default="none")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _options(args: argparse.Namespace):
    from .options import ImageOptions, TextOptions

    text = TextOptions(
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        num_beams=args.num_beams,
        stop_on_image=not args.no_stop_on_image,
    )
    image = ImageOptions(
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        scheduler=args.scheduler,
        num_images=args.num_images,
    )
    if args.seed is not None:
        text.seed, image.seed = args.seed, args.seed
    text.validate()
    if args.max_segments is not None and args.max_segments < 1:
        raise ValueError(f"--max-segments must be >= 1, got {args.max_segments}")
    return text, image


OFFICIAL_MODES = ("generate_texts", "generate_images")  # the official demo's ``generate_mode`` values


def _plan(doc, args: argparse.Namespace) -> tuple[Any, str, int]:
    """(document, mode, max_segments) of one input document (official annotation metadata as defaults)."""
    mode = args.mode
    steps = args.max_segments or doc.meta.get("num_iter", 4)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"num_iter must be a whole number >= 1, got {steps!r}")
    if mode is None:
        mode = "auto"
        official = doc.meta.get("generate_mode", "generate_texts")
        if official not in OFFICIAL_MODES:
            raise ValueError(f"generate_mode must be one of {list(OFFICIAL_MODES)}, got {official!r}")
        if official == "generate_images":
            doc = doc.append_pending_image()
    return doc, mode, steps


class ProgressBar:
    """A tqdm bar on stderr that follows the engine's progress events (one bar per document and phase)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None
        self.key: tuple[str, int] | None = None
        self.label = ""

    def start(self, label: str) -> None:
        self.label = label
        self.key = None

    def __call__(self, event) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        key = (event.phase, event.total)
        if key != self.key or event.step == 1:
            self.close()
            self.bar = tqdm(total=event.total, desc=f"{self.label} {event.phase}", file=sys.stderr, leave=False)
            self.key = key
        self.bar.update(event.step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_generate(args: argparse.Namespace) -> int:
    from .document import load_documents

    text_options, image_options = _options(args)
    docs = load_documents(args.input)
    plans = []
    for number, doc in enumerate(docs, start=1):
        if doc.without_pending_image().is_empty():
            raise ValueError(f"{args.input}: document {number} is empty (no text and no image)")
        with _naming(args.input, number):
            plans.append(_plan(doc, args))
    from .engine import InterleavedEngine  # transformers and diffusers load only once the input is valid

    start = time.perf_counter()
    engine = InterleavedEngine.from_pretrained(args.model, dtype=args.dtype, device=args.device, offload=args.offload)
    load_seconds = time.perf_counter() - start
    for number, (doc, mode, _) in enumerate(plans, start=1):  # every document, before generating any
        with _naming(args.input, number):
            engine.check_can_continue(doc, mode)
    args.out.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(len(docs) - 1)))
    bar = ProgressBar(enabled=not args.no_progress)
    records: list[dict[str, Any]] = []
    try:
        for index, (doc, mode, steps) in enumerate(plans):
            bar.start(f"doc {index + 1}/{len(docs)}")
            before = _counters(engine)
            begin = time.perf_counter()
            with _naming(args.input, index + 1):
                result = engine.generate(
                    doc,
                    mode,
                    text_options,
                    image_options,
                    steps,
                    bar,
                    force_image_after_text=args.force_image_after_text,
                )
            seconds = time.perf_counter() - begin
            bar.close()
            path = result.to_json(args.out / f"doc-{index:0{width}d}.json")
            records.append(_record(index, path, mode, seconds, before, _counters(engine), len(doc), len(result)))
    finally:  # also after an error or an interrupt: the report covers the documents written
        bar.close()
        _write_report(args, engine, records, load_seconds, text_options, image_options, len(docs))
    print(args.out)
    return 0


@contextlib.contextmanager
def _naming(source: Path, number: int) -> Iterator[None]:
    """Errors of one input document name it: ``<input>: document <number>: <what is wrong>``."""
    try:
        yield
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"{source}: document {number}: {err}") from None


def _write_report(args, engine, records, load_seconds, text_options, image_options, count: int) -> None:
    report = {
        "model": str(args.model) if args.model else "embedded",
        "input": str(args.input),
        "documents": records,
        "totals": _totals(records, load_seconds),
        "text_options": text_options.to_dict(),
        "image_options": image_options.to_dict(),
        "memory": engine.memory_report(),
        "engine_seconds_per_phase": engine.stats.seconds,
        "complete": len(records) == count,  # False: generation stopped after these documents (error, interrupt)
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def _counters(engine) -> dict[str, float]:
    stats = engine.stats
    return {
        "tokens": stats.tokens_generated,
        "images": stats.images_generated,
        "text_seconds": stats.seconds.get("text", 0.0),
        "image_seconds": stats.seconds.get("image", 0.0),
        "encode_seconds": stats.seconds.get("encode", 0.0),
    }


def _record(
    index: int, path: Path, mode: str, seconds: float, before: dict, after: dict, n_in: int, n_out: int
) -> dict[str, Any]:
    delta = {k: after[k] - before[k] for k in after}
    return {
        "index": index,
        "output": path.name,
        "mode": mode,
        "input_segments": n_in,
        "output_segments": n_out,
        "seconds": round(seconds, 4),
        "tokens_generated": int(delta["tokens"]),
        "images_generated": int(delta["images"]),
        "tokens_per_second": _rate(delta["tokens"], delta["text_seconds"]),
        "seconds_per_image": round(delta["image_seconds"] / delta["images"], 4) if delta["images"] else None,
        "encode_seconds": round(delta["encode_seconds"], 4),
    }


def _rate(count: float, seconds: float) -> float | None:
    return round(count / seconds, 2) if count and seconds > 0 else None


def _totals(records: list[dict[str, Any]], load_seconds: float) -> dict[str, Any]:
    tokens = sum(r["tokens_generated"] for r in records)
    images = sum(r["images_generated"] for r in records)
    seconds = sum(r["seconds"] for r in records)
    return {
        "documents": len(records),
        "load_seconds": round(load_seconds, 4),
        "generate_seconds": round(seconds, 4),
        "tokens_generated": tokens,
        "images_generated": images,
    }
