"""Data sources: shard lists, streaming readers (JSONL, JSON, WebDataset tar) and the document formats.

A *source* reads *shards* (files or URLs) record by record and turns each record into a ``Document``. Records are
counted in order so that a stream can resume at (shard, record) without parsing what it skips. Every random
decision of a format (image before or after its caption, MMC4 image sub-sampling, ...) uses a ``random.Random``
seeded by (seed, epoch, shard, record), so a resumed stream repeats it exactly.

Formats (``SourceConfig.format``):

* ``interleaved``: our JSONL: ``{"segments": ["text", {"image": "a.jpg"}, {"text": "...", "loss": false}]}``.
* ``wds``: WebDataset tar shards, streamed (local, ``pipe:cmd`` or http(s)). A sample with a ``json`` member that
  has ``segments`` is an interleaved document whose ``{"image": "jpg"}`` entries name members of the same
  sample; otherwise an image member plus ``txt`` (or ``json["caption"]``) is an image-text pair.
* ``pairs``: LAION/CC-style annotation lines ``{"image": path, "caption": text}`` (JSON or Python-dict lines,
  as in the official example shard); caption lower-cased, image first with probability 0.5.
* ``mmc4``: MMC4 documents (``text_list``, ``image_info`` with ``matched_text_index``/``matched_sim``).
* ``annotation``: the official annotation JSON (``sentences``, ``images``, ``sentence_ixs``, ``image_first``).
* SFT: ``llava`` (conversation JSON/JSONL), ``story`` (``images`` + ``sentences``), ``vqa``
  (``image``, ``question``, ``answer``), ``caption`` (``image``, ``caption``): the prompt is not a loss target.
* ``shapestories``: the synthetic ShapeStories corpus generated in-process, endless; ``shards`` is only a label
  (e.g. ``"shapestories"``). Options: ``seed``, ``kinds``, ``weights`` (one per kind), ``min_steps``,
  ``max_steps``, ``image_size`` (render side, default 64). Record ``i`` is document ``i`` of
  :func:`~comfy_mm_interleaved.shapestories.training_stream`.
"""

from __future__ import annotations

import ast
import glob
import gzip
import io
import json
import random
import re
import subprocess
import tarfile
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..tokenizer import ImageSegment, Segment, TextSegment
from .documents import BadInput, Document

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")


@dataclass
class SourceConfig:
    """One data source of a training mixture."""

    format: str
    shards: str | list[str]  # paths, glob patterns, {a..b} ranges, pipe:cmd or http(s) URLs
    image_root: str | None = None  # base folder of relative image paths
    dataset_name: str | None = None  # passed to the model (text-loss rules); default per format
    weight: float = 1.0  # mixture probability (normalised over sources)
    truncation: str | None = None  # "sample" (never split a document) or "image"; default per format
    max_images_per_row: int | None = None
    pack: bool = True  # False: one document per row, padded (SFT, as the official SFT collators do)
    options: dict[str, Any] = field(default_factory=dict)  # format-specific, see each format


# ---------------------------------------------------------------------------------------------------------------
# Shard lists and streams


def expand_braces(pattern: str) -> list[str]:
    """``a{0..2}`` -> a0 a1 a2 (zero padding kept), ``{x,y}`` -> x y; nested and repeated groups work."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    ranged = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if ranged:
        lo, hi = ranged.groups()
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [out for item in items for out in expand_braces(head + item + tail)]


def list_shards(spec: str | list[str], root: str | Path | None = None) -> list[str]:
    """Expand a shard spec into an ordered list of shard URLs; local glob patterns are matched and sorted."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    shards: list[str] = []
    for item in specs:
        for name in expand_braces(item):
            if name.startswith(("pipe:", "http://", "https://")):
                shards.append(name)
                continue
            path = Path(root) / name if root is not None and not Path(name).is_absolute() else Path(name)
            matches = sorted(glob.glob(str(path))) if glob.has_magic(str(path)) else [str(path)]
            shards += matches
    if not shards:
        raise ValueError(f"shard spec {spec!r} matched no file; check the path or pattern")
    return shards


@contextmanager
def open_stream(url: str) -> Iterator[BinaryIO]:
    """A binary read stream for a local file, ``pipe:command`` (stdout of a shell command) or an http(s) URL."""
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE)
        try:
            yield proc.stdout
        finally:
            proc.stdout.close()
            proc.wait()
    elif url.startswith(("http://", "https://")):
        with urllib.request.urlopen(url) as response:
            yield response
    else:
        with open(url, "rb") as handle:
            yield handle


def read_lines(url: str) -> Iterator[str]:
    """Text lines of a (possibly .gz, or single-member .zip) file, streamed; blank lines are records too."""
    with open_stream(url) as raw:
        if url.endswith(".gz"):
            stream: BinaryIO = gzip.GzipFile(fileobj=raw)
        elif url.endswith(".zip"):
            archive = zipfile.ZipFile(io.BytesIO(raw.read()))
            stream = archive.open(archive.namelist()[0])
        else:
            stream = raw
        for line in io.TextIOWrapper(stream, encoding="utf-8", errors="replace"):
            yield line.rstrip("\n")


def read_json_array(url: str) -> Iterator[Any]:
    """Items of a JSON array file (JSONL files are read line by line instead)."""
    if url.endswith((".jsonl", ".jsonl.gz", ".jsonl.zip", ".txt")):
        yield from read_lines(url)
        return
    with open_stream(url) as raw:
        data = json.load(raw)
    if not isinstance(data, list):
        raise ValueError(f"{url}: expected a JSON array of records, got {type(data).__name__}")
    yield from data


def read_tar_samples(url: str) -> Iterator[dict[str, Any]]:
    """WebDataset samples of a tar stream: consecutive members sharing a key -> {"__key__", ext: bytes}."""
    with open_stream(url) as raw:
        sample: dict[str, Any] = {}
        try:
            with tarfile.open(fileobj=raw, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, _, base = member.name.rpartition("/")
                    key, _, ext = base.partition(".")
                    key = f"{folder}/{key}" if folder else key
                    if sample and sample["__key__"] != key:
                        yield sample
                        sample = {}
                    sample["__key__"] = key
                    sample[ext.lower()] = tar.extractfile(member).read()
        except tarfile.TarError as err:
            sample = {"__key__": sample.get("__key__", "?"), "__error__": f"{url}: truncated or corrupt tar: {err}"}
        if sample:
            yield sample


# ---------------------------------------------------------------------------------------------------------------
# Record parsing helpers


def parse_record(raw: Any) -> dict[str, Any]:
    """A JSON object from a line (JSON, or a Python dict literal as in the official LAION example) or a dict."""
    if isinstance(raw, dict):
        return raw
    text = raw.strip()
    if not text:
        raise BadInput("empty_document", "blank line")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        try:
            record = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise BadInput("malformed_json", f"{err}: {text[:80]!r}") from None
    if not isinstance(record, dict):
        raise BadInput("malformed_json", f"expected an object, got {type(record).__name__}")
    return record


def require(record: dict[str, Any], *keys: str) -> list[Any]:
    missing = [k for k in keys if k not in record]
    if missing:
        raise BadInput("malformed_record", f"missing keys {missing} in {sorted(record)}")
    return [record[k] for k in keys]


def join_caption(caption: Any) -> str:
    return " ".join(caption) if isinstance(caption, list) else str(caption)


def pair_document(image: Any, caption: str, rng: random.Random, image_first_prob: float, key: str) -> Document:
    """An image-text pair as a document: image first with probability ``image_first_prob``."""
    img, txt = ImageSegment(image), TextSegment(caption)
    return Document([img, txt] if rng.random() < image_first_prob else [txt, img], key=key)


def template_segments(template: str, images: list[Any], loss: bool, **fields: str) -> list[Segment]:
    """Split a prompt template at ``{image}`` into text/image segments and fill the other ``{fields}``."""
    parts = template.split("{image}")
    if len(parts) - 1 != len(images):
        raise ValueError(f"prompt template {template!r} has {len(parts) - 1} {{image}} slots for {len(images)} images")
    out: list[Segment] = []
    for i, part in enumerate(parts):
        if part:
            out.append(TextSegment(part.format(**fields), loss=loss))
        if i < len(images):
            out.append(ImageSegment(images[i]))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Formats: each is (reader of raw records per shard, parser raw -> Document)

Parser = Callable[[Any, random.Random, dict[str, Any]], Document]


def parse_interleaved(raw: Any, rng: random.Random, opts: dict[str, Any]) -> Document:
    record = parse_record(raw)
    (items,) = require(record, "segments")
    if not isinstance(items, list):
        raise BadInput("malformed_record", "segments must be a list")
    segments: list[Segment] = []
    for item in items:
        if isinstance(item, str):
            segments.append(TextSegment(item))
        elif isinstance(item, dict) and "image" in item:
            segments.append(ImageSegment(item["image"]))
        elif isinstance(item, dict) and "text" in item:
            segments.append(TextSegment(str(item["text"]), loss=bool(item.get("loss", True))))
        else:
            raise BadInput("malformed_record", f"segment {item!r} is neither text nor image")
    return Document(segments, key=str(record.get("id", "")))


def parse_wds(sample: dict[str, Any], rng: random.Random, opts: dict[str, Any]) -> Document:
    if "__error__" in sample:
        raise BadInput("corrupt_shard", sample["__error__"])
    key = sample["__key__"]
    meta = None
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadInput("malformed_json", f"{key}.json: {err}") from None
    if isinstance(meta, dict) and "segments" in meta:
        segments: list[Segment] = []
        for item in meta["segments"]:
            if isinstance(item, dict) and "image" in item:
                name = str(item["image"]).lower()
                if name not in sample:
                    raise BadInput("missing_file", f"sample {key} has no member .{name}")
                segments.append(ImageSegment(sample[name], name=f"{key}.{name}"))
            else:
                text, loss = (item, True) if isinstance(item, str) else (item.get("text", ""), item.get("loss", True))
                segments.append(TextSegment(str(text), loss=bool(loss)))
        return Document(segments, key=key)
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if image_ext is None:
        raise BadInput("missing_file", f"sample {key} has no image member ({', '.join(IMAGE_EXTENSIONS)})")
    if "txt" in sample:
        caption = sample["txt"].decode("utf-8", errors="replace")
    elif isinstance(meta, dict) and "caption" in meta:
        caption = join_caption(meta["caption"])
    else:
        raise BadInput("malformed_record", f"sample {key} has neither .txt nor a json caption")
    if opts.get("lowercase", True):
        caption = caption.lower()
    return pair_document(sample[image_ext], caption, rng, opts.get("image_first_prob", 0.5), key)


def parse_pairs(raw: Any, rng: random.Random, opts: dict[str, Any]) -> Document:
    record = parse_record(raw)
    image, caption = require(record, "image", "caption")
    caption = join_caption(caption)
    if opts.get("lowercase", True):
        caption = caption.lower()
    return pair_document(image, caption, rng, opts.get("image_first_prob", 0.5), str(image))


def parse_mmc4(raw: Any, rng: random.Random, opts: dict[str, Any]) -> Document:
    """MMC4: keep images with ``matched_sim >= sim_threshold``, at most ``max_images`` (random subset, reading
    order kept), each before or after its matched sentence with probability ``image_first_prob``; documents
    with a single image are dropped with probability 0.5 (as the official pipeline does)."""
    record = parse_record(raw)
    sentences, image_info = require(record, "text_list", "image_info")
    threshold = opts.get("sim_threshold", 0.24)
    kept = [im for im in image_info if im.get("matched_sim", 1.0) >= threshold]
    if not kept:
        raise BadInput("no_image", f"no image with matched_sim >= {threshold}")
    rng.shuffle(kept)
    kept = sorted(kept[: opts.get("max_images", 6)], key=lambda im: im["matched_text_index"])
    if len(kept) == 1 and rng.random() < opts.get("drop_single_image_prob", 0.5):
        raise BadInput("single_image_dropped", "single-image document (dropped with probability 0.5)")
    before: dict[int, list[ImageSegment]] = {}
    after: dict[int, list[ImageSegment]] = {}
    for im in kept:
        side = before if rng.random() < opts.get("image_first_prob", 0.5) else after
        side.setdefault(im["matched_text_index"], []).append(ImageSegment(im["image_name"]))
    segments: list[Segment] = []
    for i, sentence in enumerate(sentences):
        segments += before.get(i, [])
        segments.append(TextSegment(sentence))
        segments += after.get(i, [])
    return Document(segments, key=str(record.get("url", "")))


def parse_annotation(raw: Any, rng: random.Random, opts: dict[str, Any]) -> Document:
    """The official annotation JSON item: image k goes before/after sentence ``sentence_ixs[k]``."""
    record = parse_record(raw)
    sentences, images, sentence_ixs = require(record, "sentences", "images", "sentence_ixs")
    image_first = record.get("image_first", [False] * len(images) if isinstance(images, list) else [])
    fields = {"sentences": sentences, "images": images, "sentence_ixs": sentence_ixs, "image_first": image_first}
    for key, value in fields.items():
        if not isinstance(value, list):
            raise BadInput("malformed_record", f"'{key}' must be a list, got {type(value).__name__} {value!r:.40}")
    if not (len(images) == len(sentence_ixs) == len(image_first)):
        raise BadInput("malformed_record", "images, sentence_ixs and image_first differ in length")
    for k, ix in enumerate(sentence_ixs):  # an image placed at no sentence would silently vanish
        if not isinstance(ix, int) or isinstance(ix, bool) or not 0 <= ix < len(sentences):
            raise BadInput(
                "malformed_record", f"sentence_ixs[{k}] = {ix!r} is not a sentence index (0 to {len(sentences) - 1})"
            )
    segments: list[Segment] = []
    for i, sentence in enumerate(sentences):
        mine = [k for k, ix in enumerate(sentence_ixs) if ix == i]
        segments += [ImageSegment(images[k]) for k in mine if image_first[k]]
        segments.append(TextSegment(sentence))
        segments += [ImageSegment(images[k]) for k in mine if not image_first[k]]
    return Document(segments, key=str(images[0]) if images else "")


def parse_llava(raw: Any, rng: random.Random, opts: dict[str, Any]) -> Document:
    """LLaVA conversations: human turns are prompts (no loss), gpt turns answers; ``<image>`` marks the image
    (put before the first turn when absent). ``user_template``/``answer_template`` wrap each turn."""
    record = parse_record(raw)
    (turns,) = require(record, "conversations")
    image = record.get("image")
    user_t = opts.get("user_template", "{text} ")
    answer_t = opts.get("answer_template", "{text} ")
    segments: list[Segment] = []
    placed = image is None
    for turn in turns:
        text = str(turn.get("value", ""))
        is_answer = turn.get("from") in ("gpt", "assistant")
        if is_answer:
            segments.append(TextSegment(answer_t.format(text=text), loss=True))
            continue
        if not placed:
            text = text if "<image>" in text else "<image>" + text
            head, _, tail = text.partition("<image>")
            segments += [TextSegment(user_t.format(text=head.strip()), loss=False)] if head.strip() else []
            segments.append(ImageSegment(image))
            text, placed = tail.strip(), True
        segments.append(TextSegment(user_t.format(text=text.replace("<image>", "").strip()), loss=False))
    if not any(isinstance(s, TextSegment) and s.loss for s in segments):
        raise BadInput("malformed_record", "conversation has no answer turn")
    return Document(segments, key=str(record.get("id", "")))


def parse_story(raw: Any, rng: random.Random, opts: dict[str, Any]) -> Document:
    """Visual storytelling: image k then sentence k; an optional ``prompt`` (no loss) first."""
    record = parse_record(raw)
    images, sentences = require(record, "images", "sentences")
    if len(images) != len(sentences):
        raise BadInput("malformed_record", f"{len(images)} images for {len(sentences)} sentences")
    segments: list[Segment] = [TextSegment(opts["prompt"], loss=False)] if opts.get("prompt") else []
    for image, sentence in zip(images, sentences):
        segments += [ImageSegment(image), TextSegment(sentence)]
    return Document(segments, key=str(record.get("id", "")))


VQA_PROMPT = (
    "Based on the image, please answer the question. {image}{question} Please provide an accurate answer within "
    "one word. The answer is:"
)
CAPTION_PROMPT = "{image}a photo of"


def parse_vqa(raw: Any, rng: random.Random, opts: dict[str, Any]) -> Document:
    record = parse_record(raw)
    image, question, answer = require(record, "image", "question", "answer")
    prompt = template_segments(opts.get("prompt", VQA_PROMPT), [image], loss=False, question=str(question))
    return Document(prompt + [TextSegment(" " + join_caption(answer))], key=str(image))


def parse_caption(raw: Any, rng: random.Random, opts: dict[str, Any]) -> Document:
    record = parse_record(raw)
    image, caption = require(record, "image", "caption")
    prompt = template_segments(opts.get("prompt", CAPTION_PROMPT), [image], loss=False)
    return Document(prompt + [TextSegment(" " + join_caption(caption))], key=str(image))


def read_counter(url: str) -> Iterator[int]:
    """Endless record indices 0, 1, 2, ... (generated sources; the shard name is a label)."""
    index = 0
    while True:
        yield index
        index += 1


SHAPESTORIES_OPTIONS = {"seed", "kinds", "weights", "min_steps", "max_steps", "image_size"}


def parse_shapestories(raw: Any, rng: random.Random, opts: dict[str, Any]) -> Document:
    from ..shapestories import render
    from ..shapestories.generate import KINDS, MAX_STEPS, MIN_STEPS, TRAIN_SEED, stream_document
    from ..shapestories.rules import Attributes

    unknown = set(opts) - SHAPESTORIES_OPTIONS
    if unknown:
        known = sorted(SHAPESTORIES_OPTIONS)
        raise ValueError(f"shapestories source: unknown options {sorted(unknown)}; known options: {known}")
    doc = stream_document(
        int(raw),
        seed=opts.get("seed", TRAIN_SEED),
        kinds=opts.get("kinds", KINDS),
        weights=opts.get("weights"),
        min_steps=opts.get("min_steps", MIN_STEPS),
        max_steps=opts.get("max_steps", MAX_STEPS),
    )
    size = int(opts.get("image_size", 64))
    segments: list[Segment] = [
        ImageSegment(render(seg, size)) if isinstance(seg, Attributes) else TextSegment(seg) for seg in doc.segments
    ]
    return Document(segments, key=f"shapestories-{raw}")


@dataclass(frozen=True)
class Format:
    reader: Callable[[str], Iterator[Any]]
    parse: Parser
    dataset_name: str
    truncation: str
    max_images_per_row: int


FORMATS: dict[str, Format] = {
    "interleaved": Format(read_lines, parse_interleaved, "interleaved", "image", 15),
    "wds": Format(read_tar_samples, parse_wds, "wds", "sample", 30),
    "pairs": Format(read_lines, parse_pairs, "laion_en", "sample", 30),
    "mmc4": Format(read_lines, parse_mmc4, "mmc4", "image", 15),
    "annotation": Format(read_json_array, parse_annotation, "annotation", "sample", 30),
    "llava": Format(read_json_array, parse_llava, "sft_llava", "sample", 30),
    "story": Format(read_json_array, parse_story, "sft_story", "sample", 30),
    "vqa": Format(read_json_array, parse_vqa, "sft_vqa", "sample", 30),
    "caption": Format(read_json_array, parse_caption, "sft_caption", "sample", 30),
    "shapestories": Format(read_counter, parse_shapestories, "shapestories", "sample", 30),
}


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise ValueError(f"unknown data format {name!r}; choose one of {sorted(FORMATS)}")
    return FORMATS[name]
