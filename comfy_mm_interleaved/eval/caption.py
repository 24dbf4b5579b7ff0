"""``eval coco-caption | flickr30k | nocaps``: zero-shot image captioning, scored with CIDEr and BLEU-4.

    python -m comfy_mm_interleaved eval coco-caption --model DIR --data DATA/coco [--out DIR] [--limit N]
    python -m comfy_mm_interleaved eval flickr30k    --model DIR --data DATA/flickr30k
    python -m comfy_mm_interleaved eval nocaps       --model DIR --data DATA/nocaps

Data (``--data`` is the dataset folder; ``--annotations FILE`` / ``--images DIR`` override the places looked at):

- ``coco-caption``: Karpathy's ``dataset_coco.json`` (``images[]`` with ``filepath``, ``filename``, ``split``,
  ``cocoid``, ``sentences[].raw``), images under ``DATA/<filepath>/<filename>`` (``val2014/COCO_val2014_*.jpg``);
  the 5,000-image ``test`` split (``--split val`` for the other 5,000).
- ``flickr30k``: Karpathy's ``dataset_flickr30k.json`` (same layout, no ``filepath``), images in
  ``DATA/flickr30k-images/``; the 1,000-image ``test`` split.
- ``nocaps``: ``nocaps_val_4500_captions.json`` (COCO style: ``images[]`` with ``id``, ``file_name``, ``domain``;
  ``annotations[]`` with ``image_id``, ``caption``), images in ``DATA/images/`` (or ``DATA/val/``); scores overall
  and per domain (in-, near-, out-domain).

Protocol (official ``ImageTextPairCollator`` + ``mm_eval.yaml``): the prompt ``<image> a photo of`` (the image as
``<|beginofimage|>`` + its ``<|image|>`` tokens), beam search with 5 beams, at most 20 new tokens, at least 7 (the
official ``min_length`` 8 counts a placeholder ``<s>``), length penalty 1, stop at ``</s>`` or
``<|beginofimage|>``; the caption is the generated text, trimmed. For COCO the official scoring keeps only the first
sentence (``use_1st_sentence_only``, the text before the first ``.``); ``--first-sentence`` / ``--no-first-sentence``
override. The engine resizes and center-crops every image to the model's encoder size.

Resumable (:mod:`.runs`): one line per image in ``<out>/items.jsonl``; ``report.json`` (scores, counts, skipped
images, settings, model, code revision, timings) and ``predictions.json`` (``[{"image_id", "caption"}]``, the COCO
results format) are rebuilt from all items at the end of every run.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import add_model_arguments, eval_task, load_engine, model_record
from .runs import (
    RunFolder,
    add_data_arguments,
    add_decoding_arguments,
    add_run_arguments,
    find_file,
    first_items,
    image_folder,
    load_image,
    load_json,
    require_field,
    require_some_images,
    run_pending,
    text_options,
    write_outputs,
)
from .text_metrics import TOKENIZERS, caption_scores, resolve_tokenizer

PROMPT = "a photo of"  # after the image (official instr_prompts["text"] of ImageTextPairCollator)
BEAMS, MAX_NEW_TOKENS, MIN_NEW_TOKENS, LENGTH_PENALTY = 5, 20, 7, 1.0


@dataclass(frozen=True)
class CaptionImage:
    key: str  # unique within the benchmark
    image_id: int | str  # the id of the COCO results format
    file: str  # path relative to the image folder
    references: tuple[str, ...]
    domain: str | None = None  # NoCaps only


Reader = Callable[[Any, Path, str], list[CaptionImage]]


@dataclass(frozen=True)
class CaptionBenchmark:
    task: str
    title: str
    annotation_names: tuple[str, ...]  # looked for under --data, in order
    image_folders: tuple[str, ...]  # looked for under --data (else --data itself)
    read: Reader  # (parsed JSON, its path, split) -> images
    first_sentence: bool  # the official scoring's use_1st_sentence_only
    splits: tuple[str, ...] = ()  # --split choices, the first is the default (empty: no --split)


def _read_karpathy(data: Any, path: Path, split: str) -> list[CaptionImage]:
    """Karpathy split JSON (``dataset_coco.json`` / ``dataset_flickr30k.json``): the images of ``split``."""
    entries = require_field(data, "images", list, f"Karpathy split file {path}")
    images = []
    for i, entry in enumerate(entries):
        where = f"{path} images[{i}]"
        if require_field(entry, "split", str, where) != split:
            continue
        filename = require_field(entry, "filename", str, where)
        sentences = require_field(entry, "sentences", list, where)
        references = tuple(require_field(s, "raw", str, f"{where} sentences[{j}]") for j, s in enumerate(sentences))
        image_id = entry.get("cocoid", entry.get("imgid", filename))
        folder = entry.get("filepath", "")
        images.append(CaptionImage(str(image_id), image_id, f"{folder}/{filename}" if folder else filename, references))
    if not images:
        raise ValueError(f"{path} has no images of the {split!r} split; is it a Karpathy split file?")
    return images


def _read_nocaps(data: Any, path: Path, split: str) -> list[CaptionImage]:
    """COCO-style caption file (``nocaps_val_4500_captions.json``): every image with its captions."""
    entries = require_field(data, "images", list, f"NoCaps caption file {path}")
    annotations = require_field(data, "annotations", list, f"NoCaps caption file {path}")
    captions: dict[Any, list[str]] = {}
    for i, annotation in enumerate(annotations):
        where = f"{path} annotations[{i}]"
        image_id = require_field(annotation, "image_id", (int, str), where)
        captions.setdefault(image_id, []).append(require_field(annotation, "caption", str, where))
    images = []
    for i, entry in enumerate(entries):
        where = f"{path} images[{i}]"
        image_id = require_field(entry, "id", (int, str), where)
        if image_id not in captions:
            raise ValueError(f"{where} (id {image_id}) has no caption in 'annotations'")
        domain = entry.get("domain")
        file = require_field(entry, "file_name", str, where)
        images.append(CaptionImage(str(image_id), image_id, file, tuple(captions[image_id]), domain))
    if not images:
        raise ValueError(f"{path} lists no images")
    return images


BENCHMARKS = {
    b.task: b
    for b in (
        CaptionBenchmark(
            "coco-caption",
            "COCO Karpathy test captioning (CIDEr, BLEU-4)",
            ("dataset_coco.json", "annotations/dataset_coco.json"),
            (),
            _read_karpathy,
            first_sentence=True,
            splits=("test", "val"),
        ),
        CaptionBenchmark(
            "flickr30k",
            "Flickr30k Karpathy test captioning (CIDEr, BLEU-4)",
            ("dataset_flickr30k.json", "annotations/dataset_flickr30k.json"),
            ("flickr30k-images", "images"),
            _read_karpathy,
            first_sentence=False,
            splits=("test", "val"),
        ),
        CaptionBenchmark(
            "nocaps",
            "NoCaps val captioning (CIDEr, BLEU-4; overall and per domain)",
            ("nocaps_val_4500_captions.json", "annotations/nocaps_val_4500_captions.json"),
            ("images", "val", "validation"),
            _read_nocaps,
            first_sentence=False,
        ),
    )
}


def _arguments_for(benchmark: CaptionBenchmark) -> Callable[[argparse.ArgumentParser], None]:
    def add(parser: argparse.ArgumentParser) -> None:
        add_model_arguments(parser)
        caption_file = ("--annotations", "caption file", benchmark.annotation_names[0])
        add_data_arguments(parser, "annotations and images", [caption_file])
        if benchmark.splits:
            parser.add_argument("--split", choices=benchmark.splits, default=benchmark.splits[0])
        add_run_arguments(parser, Path("output") / f"eval-{benchmark.task}")
        add_decoding_arguments(parser, BEAMS, MAX_NEW_TOKENS, MIN_NEW_TOKENS, LENGTH_PENALTY)
        parser.add_argument("--prompt", default=PROMPT, help=f"text after the image (official: {PROMPT!r})")
        parser.add_argument(
            "--first-sentence",
            action=argparse.BooleanOptionalAction,
            default=benchmark.first_sentence,
            help="score only the text before the first '.' (official: "
            f"{'on' if benchmark.first_sentence else 'off'} for this benchmark)",
        )
        parser.add_argument(
            "--caption-tokenizer",
            choices=TOKENIZERS,
            default="auto",
            help="tokenizer of the scores: the Java PTB tokenizer of pycocoevalcap, or its pure-Python stand-in "
            "(auto: Java when java is on the PATH)",
        )

    return add


def score_captions(
    images: list[CaptionImage], captions: dict[str, str], first_sentence: bool, tokenizer: str
) -> dict[str, Any]:
    """BLEU-1..4 and CIDEr (x100) of the captioned images; NoCaps images also per domain."""
    done = [image for image in images if image.key in captions]

    def scores(subset: list[CaptionImage]) -> dict[str, float]:
        predictions = {i.key: captions[i.key].split(".")[0] if first_sentence else captions[i.key] for i in subset}
        return caption_scores({i.key: i.references for i in subset}, predictions, tokenizer)

    domains = sorted({i.domain for i in done if i.domain is not None})
    if not domains:
        return scores(done)
    return {"overall": scores(done), **{d: scores([i for i in done if i.domain == d]) for d in domains}}


def _run(benchmark: CaptionBenchmark, args: argparse.Namespace) -> int:
    from ..inference.document import Interleaved
    from ..inference.engine import resolve_model_dir

    options = text_options(args)
    tokenizer = resolve_tokenizer(args.caption_tokenizer)
    split = getattr(args, "split", "val")
    annotations = find_file(args.annotations, args.data, benchmark.annotation_names, "caption file", "--annotations")
    images = first_items(benchmark.read(load_json(annotations, "caption file"), annotations, split), args.limit)
    folder = image_folder(args.images, args.data, benchmark.image_folders)
    folder_model = resolve_model_dir(args.model)
    settings = {
        "benchmark": benchmark.task,
        "annotations": str(annotations.resolve()),
        "images": str(folder.resolve()),
        "split": split if benchmark.splits else None,
        "prompt": f"<image> {args.prompt}",
        "decoding": options.to_dict(),
        "dtype": args.dtype,
        "model": model_record(folder_model, embedded=args.model is None),
    }
    run = RunFolder(args.out, settings, overwrite=args.overwrite)
    done = run.done_keys()
    require_some_images(folder, [i.file for i in images if i.key not in done])

    missing = any(i.key not in done for i in images)
    engine, _, load_seconds = load_engine(args) if missing else (None, None, 0.0)

    def caption(image: CaptionImage) -> dict[str, Any]:
        picture = load_image(folder, image.file)
        result = engine.generate_text(Interleaved([picture, args.prompt]), options)
        return {"image_id": image.image_id, "caption": result.text.strip(), "new_tokens": len(result.token_ids)}

    skips, run_seconds = run_pending(
        run, [(i.key, i) for i in images], caption, benchmark.task, progress=not args.no_progress
    )
    selected = {i.key for i in images}
    items = [item for item in run.items() if item["key"] in selected]
    captions = {item["key"]: item["caption"] for item in items}
    start = time.perf_counter()
    metrics = score_captions(images, captions, args.first_sentence, tokenizer) if captions else None
    path = write_outputs(
        run,
        header={"benchmark": benchmark.task, "title": benchmark.title, "metric_scale": "x100 (as in papers)"},
        metrics=metrics,
        items=items,
        selected=len(images),
        skips=skips,
        settings={
            **settings,
            "limit": args.limit,
            "first_sentence_only": args.first_sentence,
            "caption_tokenizer": tokenizer,
            "placement": engine.placement.to_dict() if engine is not None else None,
        },
        predictions=[{"image_id": item["image_id"], "caption": item["caption"]} for item in items],
        timings={
            "load_seconds": load_seconds,
            "this_run_seconds": run_seconds,
            "scoring_seconds": time.perf_counter() - start,
        },
    )
    if metrics is None:
        print(f"{benchmark.task}: no image could be captioned (see 'skipped' in {path})", file=sys.stderr)
        return 1
    summary = metrics.get("overall", metrics)
    print(f"{benchmark.task}: CIDEr {summary['CIDEr']:.2f} BLEU-4 {summary['BLEU_4']:.2f}", file=sys.stderr)
    print(path)
    return 0


def _register(benchmark: CaptionBenchmark) -> None:
    @eval_task(benchmark.task, benchmark.title, _arguments_for(benchmark))
    def run(args: argparse.Namespace) -> int:
        return _run(benchmark, args)


for _benchmark in BENCHMARKS.values():
    _register(_benchmark)
