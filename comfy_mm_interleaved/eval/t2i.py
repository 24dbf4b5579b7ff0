"""Text-to-image benchmarks: ``eval coco-t2i`` (MS-COCO val2014, 30K captions), ``eval lncoco-t2i`` (LN-COCO) and
``eval fid`` (FID / KID between two image folders).

    python -m comfy_mm_interleaved eval coco-t2i --model DIR --data COCO --inception inception.safetensors \\
        [--clip clip-vit-large-patch14] [--out DIR] [--limit N]  # COCO/annotations/captions_val2014.json, COCO/val2014
    python -m comfy_mm_interleaved eval lncoco-t2i --model DIR --data LNCOCO --images COCO/val2017 --inception ...
    python -m comfy_mm_interleaved eval fid --real DIR --fake DIR --inception inception.safetensors

``--annotations FILE`` / ``--images DIR`` point at the captions file / real images when they are not under
``--data`` (:attr:`Benchmark.annotation_names`, :attr:`Benchmark.image_folders`).

Captions. COCO (``--selection per-image``, the default and the common MS-COCO 30K protocol): one caption per image,
``--total`` images (default 30000) drawn without replacement from the captioned images with
``random.Random(--seed)``, then one of each image's captions with the same generator; ``--selection file-order``:
the first ``--total`` captions of the file, as the official ``mm_eval.yaml`` takes them (several captions of one
image possible). Captions are lower-cased (official). LN-COCO: the narratives in file order; when ``--total``
exceeds their number they are over-sampled image-balanced as the official ``lncoco.py`` does (each narrative drawn
with probability proportional to 1 / the number of narratives of its image, with replacement, here from
``numpy.random.default_rng(--seed)``). ``--limit N`` takes the first N captions of that list, so a limited run is
the start of the full one.

Images. Prompt ``<s>{caption}<BOI>`` + the image; ``--samples`` images per caption (seeds ``--seed + index *
samples + k``), the one whose CLIP image embedding is closest (cosine) to the caption's text embedding is kept when
``--clip DIR`` is given (official COCO setting: 8 samples, CLIP ViT-L/14). Kept images are saved as
``<out>/images/<index>.png``.

Metrics. FID and KID (:mod:`.fid`) between the Inception features (:mod:`.inception`) of the generated images and
the real image of every caption (an image used by several captions counts once per caption, as in the official
evaluation), each resized + centre-cropped to ``--fid-resolution`` (256, the standard protocol; 64 = the official
code's variant), then bilinearly to 299.

Resume: the run folder (:class:`.runs.RunFolder`) keeps ``run_settings.json`` and ``items.jsonl`` (one line per
finished caption, written after its PNG); a rerun generates only the captions without an item, then recomputes the
metrics over all of them. ``--images-only`` generates without computing metrics (no Inception weights needed); rerun the
same command with ``--inception`` later. ``report.json``: fid, kid_mean, kid_std, n_real, n_fake, settings, model
record, code revision, timings.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import add_model_arguments, check_ranges, eval_task, git_revision, load_engine, model_record
from .runs import (
    RunFolder,
    add_data_arguments,
    add_run_arguments,
    find_file,
    first_items,
    image_folder,
    load_json,
    run_pending,
)
from .shapes import SCHEDULER_CHOICES

DEFAULT_TOTAL = 30_000
OFFICIAL_STEPS = 250
OFFICIAL_GUIDANCE = 3.5
OFFICIAL_COCO_SAMPLES = 8  # re-ranked by CLIP ViT-L/14
IMAGES_FOLDER = "images"
SHOWN_MISSING = 5


@dataclass(frozen=True)
class Caption:
    """One caption to draw and the real image it is compared with."""

    index: int
    caption: str
    image_id: int
    real_name: str  # file name of the real image in the benchmark's image folder

    @property
    def key(self) -> str:
        return f"{self.index:05d}"

    @property
    def file_name(self) -> str:
        return f"{self.key}.png"


# ----------------------------------------------------------------------------------------------------------------
# Benchmarks' caption lists


def _field(record: Any, name: str, kind: type, where: str) -> Any:
    if not isinstance(record, dict) or not isinstance(record.get(name), kind) or isinstance(record.get(name), bool):
        raise ValueError(f"{where} needs a {kind.__name__} {name!r}, got {record!r:.200}")
    return record[name]


def _image_id(record: Any, where: str) -> int:
    value = record.get("image_id") if isinstance(record, dict) else None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return _field(record, "image_id", int, where)


def _caption_text(text: str, where: str) -> str:
    """The caption as the file has it (the official prompt keeps it verbatim); an error when it is blank."""
    if not text.strip():
        raise ValueError(f"{where} has an empty caption")
    return text


def coco_captions(captions_file: Path, total: int, seed: int, selection: str = "per-image") -> list[Caption]:
    """MS-COCO ``captions_*.json`` (COCO format). ``per-image``: one random caption of each of ``total`` random
    images; ``file-order``: the first ``total`` captions of the file (the official ``mm_eval.yaml``: several captions
    of one image possible)."""
    data = load_json(captions_file, "COCO captions file")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"{captions_file} is not a COCO captions file (a JSON object with 'annotations', 'images')")
    if not isinstance(data.get("images"), list):
        raise ValueError(
            f"{captions_file} has no 'images' list (file names of the images); is it captions_val2014.json?"
        )
    file_names = {
        _field(image, "id", int, f"{captions_file} images[{i}]"): _field(image, "file_name", str, f"{captions_file}")
        for i, image in enumerate(data["images"])
    }
    entries = []  # (annotation id, image id, lower-cased caption) in file order
    for i, annotation in enumerate(data["annotations"]):
        where = f"{captions_file} annotations[{i}]"
        text = _caption_text(_field(annotation, "caption", str, where), where).lower()
        entries.append((_field(annotation, "id", int, where), _field(annotation, "image_id", int, where), text))
    unknown = sorted({image_id for _, image_id, _ in entries} - set(file_names))
    if unknown:
        raise ValueError(
            f"{captions_file}: annotations name image ids missing from 'images': {unknown[:SHOWN_MISSING]}"
        )
    if not entries:
        raise ValueError(f"{captions_file} has no captions")
    if selection == "file-order":
        return [
            Caption(i, text, image_id, file_names[image_id]) for i, (_, image_id, text) in enumerate(entries[:total])
        ]
    by_image: dict[int, list[tuple[int, str]]] = {}
    for annotation_id, image_id, text in entries:
        by_image.setdefault(image_id, []).append((annotation_id, text))
    rng = random.Random(seed)
    chosen = rng.sample(sorted(by_image), min(total, len(by_image)))
    captions = []
    for index, image_id in enumerate(chosen):
        _, text = rng.choice(sorted(by_image[image_id]))
        captions.append(Caption(index, text, image_id, file_names[image_id]))
    return captions


def lncoco_captions(narratives_file: Path, total: int, seed: int, selection: str = "official") -> list[Caption]:
    """LN-COCO ``coco_val_captions.jsonl`` (Localized Narratives: {image_id, caption, ...} per line), over-sampled
    image-balanced up to ``total`` (official ``lncoco.py``); real images ``<image_id:012d>.jpg`` (COCO val2017)."""
    import numpy as np

    if not narratives_file.is_file():
        raise FileNotFoundError(f"LN-COCO captions file not found: {narratives_file}")
    records = []
    for number, line in enumerate(narratives_file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{narratives_file} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where} is not valid JSON: {err}") from err
        records.append((_image_id(record, where), _caption_text(_field(record, "caption", str, where), where)))
    if not records:
        raise ValueError(f"{narratives_file} has no captions")
    if total <= len(records):
        records = records[:total]
    else:
        per_image = Counter(image_id for image_id, _ in records)
        weights = np.array([1 / per_image[image_id] for image_id, _ in records])
        extra = np.random.default_rng(seed).choice(len(records), total - len(records), p=weights / weights.sum())
        records += [records[i] for i in extra]
    return [Caption(i, text, image_id, f"{image_id:012d}.jpg") for i, (image_id, text) in enumerate(records)]


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    read_captions: Callable[[Path, int, int, str], list[Caption]]  # (file, total, seed, selection) -> captions
    annotation_names: tuple[str, ...]  # where the captions file is looked for under --data
    image_folders: tuple[str, ...]  # where the real images are looked for under --data
    selections: dict[str, str]  # --selection choices (the first is the default) and what each does


BENCHMARKS = {
    b.name: b
    for b in (
        Benchmark(
            "coco-t2i",
            "MS-COCO val2014 captions",
            coco_captions,
            ("annotations/captions_val2014.json", "captions_val2014.json"),
            ("val2014", "images/val2014"),
            {
                "per-image": "random.Random(seed).sample of the captioned images, then .choice of one caption of "
                "each (the common MS-COCO 30K protocol)",
                "file-order": "the first --total captions of the file, several per image possible (official "
                "mm_eval.yaml)",
            },
        ),
        Benchmark(
            "lncoco-t2i",
            "LN-COCO",
            lncoco_captions,
            ("coco_val_captions.jsonl", "annotations/coco_val_captions.jsonl", "lncoco/coco_val_captions.jsonl"),
            ("val2017", "images/val2017", "coco/val2017"),
            {
                "official": "file order; above the file size, image-balanced over-sampling with numpy "
                "default_rng(seed) (official lncoco.py)"
            },
        ),
    )
}


def real_images(captions: list[Caption], folder: Path, benchmark: Benchmark) -> list[Path]:
    """The real image of every caption; a clear error when any is missing."""
    paths = [folder / c.real_name for c in captions]
    missing = sorted({str(p) for p in paths if not p.is_file()})
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} real image(s) missing, e.g. {', '.join(missing[:SHOWN_MISSING])}; point --images at the "
            f"folder of the {benchmark.title} images (COCO {benchmark.image_folders[0]})"
        )
    return paths


# ----------------------------------------------------------------------------------------------------------------
# CLIP re-ranking


class ClipReranker:
    """Scores images against a caption with a local transformers CLIP folder (cosine of the projected embeddings)."""

    def __init__(self, folder: Path, device: Any) -> None:
        from transformers import CLIPModel, CLIPProcessor

        if not folder.is_dir():
            raise FileNotFoundError(
                f"CLIP folder {folder} does not exist; pass a transformers CLIPModel folder (config.json, weights, "
                "tokenizer and preprocessor files), e.g. openai/clip-vit-large-patch14 downloaded yourself"
            )
        try:
            # safetensors only: a folder with only pytorch_model.bin is refused (no pickle is read at run time)
            model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=True)
            self.model = model.to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"{folder} is not a complete transformers CLIP folder ({err})") from None
        self.device = device
        self.max_length = self.model.config.text_config.max_position_embeddings

    def scores(self, images: list[Any], caption: str) -> list[float]:
        import torch

        inputs = self.processor(
            text=[caption],
            images=images,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.max_length,
        ).to(self.device)
        with torch.no_grad():
            outputs = self.model(**inputs)
        return (outputs.image_embeds @ outputs.text_embeds.T)[:, 0].float().cpu().tolist()  # embeddings are unit


# ----------------------------------------------------------------------------------------------------------------
# Metrics (shared by the benchmarks and ``eval fid``)


def _add_metric_arguments(parser: argparse.ArgumentParser) -> None:
    from .fid import KID_SUBSET_SIZE, KID_SUBSETS
    from .inception import STANDARD_RESOLUTION

    parser.add_argument(
        "--inception", type=Path, default=None, help="FID Inception weights (.safetensors from convert-inception)"
    )
    parser.add_argument(
        "--fid-resolution",
        type=int,
        default=STANDARD_RESOLUTION,
        help=f"resize + centre-crop every image to this size before Inception ({STANDARD_RESOLUTION}: the standard "
        "protocol; 64: the official MM-Interleaved code)",
    )
    parser.add_argument("--batch-size", type=int, default=50, help="images per Inception batch (default 50)")
    parser.add_argument("--workers", type=int, default=0, help="image-decoding processes for Inception (default 0)")
    parser.add_argument("--kid-subsets", type=int, default=KID_SUBSETS, help=f"KID subsets (default {KID_SUBSETS})")
    parser.add_argument(
        "--kid-subset-size", type=int, default=KID_SUBSET_SIZE, help=f"KID subset size (default {KID_SUBSET_SIZE})"
    )


def _check_metric_arguments(args: argparse.Namespace) -> None:
    checks = {
        "--fid-resolution": args.fid_resolution >= 1,
        "--batch-size": args.batch_size >= 1,
        "--workers": args.workers >= 0,
        "--kid-subsets": args.kid_subsets >= 1,
        "--kid-subset-size": args.kid_subset_size >= 2,
    }
    check_ranges(checks, "--fid-resolution, --batch-size, --kid-subsets >= 1, --workers >= 0, --kid-subset-size >= 2")


def _missing_inception_message(images_only_hint: bool) -> str:
    from .inception import WEIGHTS_HELP

    hint = "; or pass --images-only to only generate the images now and compute FID later" if images_only_hint else ""
    return f"--inception PATH is required for FID / KID: {WEIGHTS_HELP}{hint}"


def _device(args: argparse.Namespace) -> Any:
    import torch

    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _set_threads(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


def compute_metrics(inception: Any, real: list[Path], fake: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    """FID and KID between the image files ``real`` and ``fake`` (a real file listed twice is encoded once and
    counts twice), with the feature and metric timings."""
    from .fid import fid_from_features, kernel_inception_distance
    from .inception import inception_features

    start = time.perf_counter()
    unique = list(dict.fromkeys(real))
    row = {path: i for i, path in enumerate(unique)}
    options = {"resolution": args.fid_resolution, "batch_size": args.batch_size, "workers": args.workers}
    real_features = inception_features(inception, unique, **options)[[row[path] for path in real]]
    fake_features = inception_features(inception, fake, **options)
    features_seconds = time.perf_counter() - start
    start = time.perf_counter()
    fid = fid_from_features(real_features, fake_features)
    kid = kernel_inception_distance(real_features, fake_features, args.kid_subsets, args.kid_subset_size)
    return {
        "fid": fid,
        "kid_mean": kid.mean,
        "kid_std": kid.std,
        "kid_subsets": kid.subsets,
        "kid_subset_size": kid.subset_size,
        "n_real": len(real),
        "n_real_unique": len(unique),
        "n_fake": len(fake),
        "timings": {
            "features_seconds": round(features_seconds, 3),
            "metric_seconds": round(time.perf_counter() - start, 3),
        },
    }


def _metric_settings(args: argparse.Namespace) -> dict[str, Any]:
    from .fid import KID_SEED
    from .inception import INPUT_SIZE
    from .inception_convert import file_sha256

    return {
        "inception": {"file": str(args.inception.resolve()), "sha256": file_sha256(args.inception)},
        "fid_resolution": args.fid_resolution,
        "preprocessing": f"RGB, shorter side to {args.fid_resolution} (PIL bicubic), centre crop "
        f"{args.fid_resolution}x{args.fid_resolution}, [0, 1], bilinear to {INPUT_SIZE}x{INPUT_SIZE}, [-1, 1]",
        "kid": {
            "kernel": "(x.y / d + 1)^3",
            "subsets": args.kid_subsets,
            "subset_size": args.kid_subset_size,
            "seed": KID_SEED,
        },
    }


# ----------------------------------------------------------------------------------------------------------------
# eval coco-t2i / lncoco-t2i


def _benchmark_arguments(benchmark: Benchmark) -> Callable[[argparse.ArgumentParser], None]:
    def add(parser: argparse.ArgumentParser) -> None:
        add_model_arguments(parser)
        captions_file = ("--annotations", "captions file", benchmark.annotation_names[0])
        images_help = f"real images (default: --data/{benchmark.image_folders[0]})"
        add_data_arguments(parser, "captions file and images", [captions_file], images_help)
        add_run_arguments(parser, Path("output") / f"eval-{benchmark.name}")
        parser.add_argument(
            "--selection",
            choices=list(benchmark.selections),
            default=next(iter(benchmark.selections)),
            help="which captions: " + "; ".join(f"{name}: {what}" for name, what in benchmark.selections.items()),
        )
        parser.add_argument(
            "--total", type=int, default=DEFAULT_TOTAL, help=f"captions of the benchmark (default {DEFAULT_TOTAL})"
        )
        parser.add_argument("--seed", type=int, default=0, help="seed of the caption draw and the images (default 0)")
        parser.add_argument(
            "--steps", type=int, default=OFFICIAL_STEPS, help=f"diffusion steps (official: {OFFICIAL_STEPS})"
        )
        parser.add_argument(
            "--guidance-scale", type=float, default=OFFICIAL_GUIDANCE, help=f"guidance (official: {OFFICIAL_GUIDANCE})"
        )
        parser.add_argument("--scheduler", choices=SCHEDULER_CHOICES, default="ddpm", help="sampler (official: ddpm)")
        parser.add_argument(
            "--samples",
            type=int,
            default=None,
            help=f"images per caption, the best by CLIP kept (default {OFFICIAL_COCO_SAMPLES} with --clip for "
            "coco-t2i, else 1)",
        )
        parser.add_argument("--clip", type=Path, default=None, help="local transformers CLIP folder for re-ranking")
        parser.add_argument("--images-only", action="store_true", help="only generate the images (no FID / KID)")
        _add_metric_arguments(parser)

    return add


def _samples(args: argparse.Namespace) -> int:
    if args.samples is None:
        return OFFICIAL_COCO_SAMPLES if args.clip is not None and args.task == "coco-t2i" else 1
    if args.samples > 1 and args.clip is None:
        raise ValueError(f"--samples {args.samples} needs --clip DIR to choose among the samples (or --samples 1)")
    return args.samples


def _check_benchmark_arguments(args: argparse.Namespace) -> None:
    checks = {
        "--steps": args.steps >= 1,
        "--guidance-scale": args.guidance_scale >= 0,
        "--total": args.total >= 1,
        "--samples": args.samples is None or args.samples >= 1,
    }
    check_ranges(checks, "--steps, --total, --samples >= 1, --guidance-scale >= 0")
    _check_metric_arguments(args)
    if not args.images_only and args.inception is None:
        raise ValueError(_missing_inception_message(images_only_hint=True))


def _run_settings(args: argparse.Namespace, annotations: Path, samples: int, model: dict[str, Any]) -> dict[str, Any]:
    """What the generated images depend on: a rerun in the same --out must match (``RunFolder``)."""
    from .inception_convert import file_sha256

    return {
        "benchmark": args.task,
        "annotations": str(annotations.resolve()),
        "annotations_sha256": file_sha256(annotations),
        "selection": args.selection,
        "total": args.total,
        "seed": args.seed,
        "sampling": {
            "steps": args.steps,
            "guidance_scale": args.guidance_scale,
            "scheduler": args.scheduler,
            "samples": samples,
            "clip": None if args.clip is None else str(args.clip.resolve()),
        },
        "dtype": args.dtype,
        "model": model,
    }


def _image_maker(args: argparse.Namespace, folder: Path, samples: int) -> tuple[Callable[[Caption], dict], float]:
    """``work(caption) -> item`` for :func:`run_pending`: draw ``samples`` images, keep the best by CLIP (or the
    only one), save it as ``folder/<index>.png``; also the model loading seconds."""
    from ..inference.document import Interleaved
    from ..inference.options import ImageOptions

    reranker = None if args.clip is None else ClipReranker(args.clip, _device(args))  # its errors come first
    engine, _, load_seconds = load_engine(args)

    def draw(caption: Caption) -> dict[str, Any]:
        seed = args.seed + caption.index * samples
        options = ImageOptions(args.steps, args.guidance_scale, args.scheduler, seed=seed, num_images=samples)
        images = engine.generate_images(Interleaved([caption.caption]), options).images
        scores = reranker.scores(images, caption.caption) if reranker is not None else None
        chosen = 0 if scores is None else max(range(samples), key=scores.__getitem__)
        temporary = folder / f"{caption.key}.tmp.png"
        images[chosen].save(temporary)
        os.replace(temporary, folder / caption.file_name)  # the item is appended after its image is in place
        return {
            "caption": caption.caption,
            "image_id": caption.image_id,
            "real": caption.real_name,
            "image": f"{IMAGES_FOLDER}/{caption.file_name}",
            "seed": seed,
            "clip_scores": scores,
            "chosen": chosen,
        }

    return draw, load_seconds


def _check_saved_images(run: RunFolder, captions: list[Caption]) -> None:
    done = run.done_keys()
    lost = [c.file_name for c in captions if c.key in done and not (run.out / IMAGES_FOLDER / c.file_name).is_file()]
    if lost:
        raise FileNotFoundError(
            f"{run.items_path} lists {len(lost)} caption(s) whose image is missing from {run.out / IMAGES_FOLDER} "
            f"(e.g. {', '.join(lost[:SHOWN_MISSING])}); restore them or pass --overwrite to generate all again"
        )


def run_benchmark(args: argparse.Namespace) -> int:
    from ..inference.engine import resolve_model_dir
    from .inception import load_fid_inception

    _check_benchmark_arguments(args)
    benchmark = BENCHMARKS[args.task]
    samples = _samples(args)
    annotations = find_file(args.annotations, args.data, benchmark.annotation_names, "captions file", "--annotations")
    benchmark_captions = benchmark.read_captions(annotations, args.total, args.seed, args.selection)
    if len(benchmark_captions) < args.total:  # a short annotations file: the benchmark is smaller than its name says
        print(
            f"warning: {annotations} gives {len(benchmark_captions)} captions, fewer than --total {args.total}; "
            "the scores are of that smaller set (report: settings.benchmark_size)",
            file=sys.stderr,
        )
    captions = first_items(benchmark_captions, args.limit)
    images = image_folder(args.images, args.data, benchmark.image_folders)
    real = None if args.images_only else real_images(captions, images, benchmark)  # checked before generating
    _set_threads(args)
    inception = None if args.images_only else load_fid_inception(args.inception, _device(args))
    model = model_record(resolve_model_dir(args.model), embedded=args.model is None)
    if args.overwrite:
        for old in (args.out / IMAGES_FOLDER).glob("*.png"):
            old.unlink()
    run = RunFolder(args.out, _run_settings(args, annotations, samples, model), overwrite=args.overwrite)
    (run.out / IMAGES_FOLDER).mkdir(exist_ok=True)
    _check_saved_images(run, captions)
    done = run.done_keys()
    new = sum(c.key not in done for c in captions)
    load_seconds = generate_seconds = 0.0
    if new:
        draw, load_seconds = _image_maker(args, run.out / IMAGES_FOLDER, samples)
        pending = [(c.key, c) for c in captions]
        _, generate_seconds = run_pending(run, pending, draw, args.task, progress=not args.no_progress)
    items = {item["key"]: item for item in run.items()}
    report: dict[str, Any] = {
        "benchmark": args.task,
        "dataset": benchmark.title,
        "fid": None,
        "kid_mean": None,
        "kid_std": None,
        "n_real": None,
        "n_fake": len(captions),
        "settings": {
            **run.settings,
            "limit": args.limit,
            "benchmark_size": len(benchmark_captions),  # --total, or fewer when the annotations hold fewer
            "n_captions": len(captions),
            "images": str(images.resolve()),
            "device": str(_device(args)),
            "selection_rule": benchmark.selections[args.selection],
        },
        "model": model,
        "code": git_revision(),
        "timings": {
            "load_seconds": round(load_seconds, 3),
            "generate_seconds": round(generate_seconds, 3),
            "images_generated": new,
            "generate_seconds_all_items": round(sum(items[c.key]["seconds"] for c in captions), 3),
        },
        "files": {"images": f"{IMAGES_FOLDER}/", "items": run.items_path.name, "settings": run.settings_path.name},
    }
    if inception is not None and real is not None:
        fake = [run.out / IMAGES_FOLDER / c.file_name for c in captions]
        metrics = compute_metrics(inception, real, fake, args)
        report["timings"].update(metrics.pop("timings"))
        report.update(metrics)
        report["settings"]["metric"] = _metric_settings(args)
    path = run.write_report(report)
    if inception is None:
        print("images only: rerun the same command with --inception FILE to compute FID / KID", file=sys.stderr)
    else:
        print(f"FID {report['fid']:.4f}  KID {report['kid_mean']:.6f} +- {report['kid_std']:.6f}", file=sys.stderr)
    print(path)
    return 0


eval_task("coco-t2i", "MS-COCO 30K text-to-image: FID, KID", _benchmark_arguments(BENCHMARKS["coco-t2i"]))(
    run_benchmark
)
eval_task("lncoco-t2i", "LN-COCO text-to-image: FID, KID", _benchmark_arguments(BENCHMARKS["lncoco-t2i"]))(
    run_benchmark
)


# ----------------------------------------------------------------------------------------------------------------
# eval fid


def _fid_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--real", type=Path, required=True, help="folder of real images")
    parser.add_argument("--fake", type=Path, required=True, help="folder of generated images")
    parser.add_argument("--out", type=Path, default=Path("output") / "eval-fid", help="report folder")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of torch")
    _add_metric_arguments(parser)


@eval_task("fid", "FID and KID between two image folders", _fid_arguments)
def run_fid(args: argparse.Namespace) -> int:
    from .inception import image_files, load_fid_inception

    _check_metric_arguments(args)
    if args.inception is None:
        raise ValueError(_missing_inception_message(images_only_hint=False))
    real, fake = image_files(args.real, "--real"), image_files(args.fake, "--fake")
    _set_threads(args)
    inception = load_fid_inception(args.inception, _device(args))
    metrics = compute_metrics(inception, real, fake, args)
    report = {
        "benchmark": "fid",
        **{k: v for k, v in metrics.items() if k != "timings"},
        "settings": {
            "real": str(args.real.resolve()),
            "fake": str(args.fake.resolve()),
            "device": str(_device(args)),
            "metric": _metric_settings(args),
        },
        "code": git_revision(),
        "timings": metrics["timings"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "report.json"
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"FID {report['fid']:.4f}  KID {report['kid_mean']:.6f} +- {report['kid_std']:.6f}", file=sys.stderr)
    print(path)
    return 0
