"""``eval vqav2 | okvqa | textvqa | vizwiz``: zero-shot visual question answering, scored with VQA accuracy.

    python -m comfy_mm_interleaved eval vqav2   --model DIR --data DATA/vqav2 [--out DIR] [--limit N]
    python -m comfy_mm_interleaved eval okvqa   --model DIR --data DATA/okvqa
    python -m comfy_mm_interleaved eval textvqa --model DIR --data DATA/textvqa
    python -m comfy_mm_interleaved eval vizwiz  --model DIR --data DATA/vizwiz

Data (``--data`` is the dataset folder; ``--questions FILE``, ``--annotations FILE`` and ``--images DIR`` override
the places looked at):

- ``vqav2``: ``v2_OpenEnded_mscoco_val2014_questions.json`` (``questions[]``: ``question_id``, ``image_id``,
  ``question``) and ``v2_mscoco_val2014_annotations.json`` (``annotations[]``: ``question_id``, ``image_id``,
  ``answers[10]`` of ``{answer, answer_confidence}``, ``answer_type``); images
  ``val2014/COCO_val2014_<image_id:012d>.jpg``.
- ``okvqa``: the same layout, files ``OpenEnded_mscoco_val2014_questions.json`` and
  ``mscoco_val2014_annotations.json``.
- ``textvqa``: ``TextVQA_0.5.1_val.json`` (``data[]``: ``question_id``, ``image_id``, ``question``, ``answers`` as 10
  strings); images ``train_images/<image_id>.jpg`` (the val images ship in the train folder).
- ``vizwiz``: ``val.json`` (a list of ``{image, question, answers[{answer, answer_confidence}], answer_type,
  answerable}``); images ``val/<image>``.

Protocol (official ``VQACollator`` + ``mm_eval.yaml``): the prompt ``Based on the image, please answer the question.
<image>{question} Please provide an accurate answer within one word. The answer is:`` (VizWiz inserts ``When the
provided information is insufficient, respond with 'Unanswerable'.`` before ``Please``), beam search with 3 beams,
at most 10 new tokens, no minimum, length penalty 0 (beams ranked by total log-probability), stop at ``</s>`` or
``<|beginofimage|>``. Scoring: the official short-answer extraction, then VQA accuracy (VQAv2 toolkit; VizWiz
toolkit for VizWiz), see :mod:`.text_metrics`; reported x100, overall and per answer type.

Resumable (:mod:`.runs`): one line per question in ``<out>/items.jsonl`` (the raw generated text); ``report.json``
and ``predictions.json`` (``[{"question_id", "answer"}]``, or ``[{"image", "answer"}]`` for VizWiz: the results
format of the evaluation servers, extracted answers) are rebuilt from all items at the end of every run.
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
from .text_metrics import extract_short_answer, vizwiz_accuracy, vqa_accuracy

PROMPT_BEFORE_IMAGE = "Based on the image, please answer the question."
PROMPT_AFTER_QUESTION = "Please provide an accurate answer within one word. The answer is:"
VIZWIZ_INSTRUCTION = "When the provided information is insufficient, respond with 'Unanswerable'."
BEAMS, MAX_NEW_TOKENS, MIN_NEW_TOKENS, LENGTH_PENALTY = 3, 10, 0, 0.0


@dataclass(frozen=True)
class Question:
    key: str  # unique within the benchmark
    question_id: int | str  # the id of the results format (VizWiz: the image file name)
    question: str
    file: str  # image path relative to the image folder
    answers: tuple[str, ...]  # the human answers
    answer_type: str | None


Reader = Callable[[list[tuple[Any, Path]]], list[Question]]


@dataclass(frozen=True)
class VQABenchmark:
    task: str
    title: str
    files: tuple[tuple[str, str, tuple[str, ...]], ...]  # (option, what, names looked for under --data)
    image_folders: tuple[str, ...]
    read: Reader  # parsed files (in the order of ``files``) -> questions
    protocol: str  # "vqav2" or "vizwiz" (which official toolkit scores it)
    instruction: str = ""  # extra sentence after the question
    results_id: str = "question_id"  # the id field of predictions.json


def _answer_dicts(entry: Any, where: str) -> tuple[str, ...]:
    answers = require_field(entry, "answers", list, where)
    return tuple(require_field(a, "answer", str, f"{where} answers[{j}]") for j, a in enumerate(answers))


def _read_vqa_pair(files: list[tuple[Any, Path]]) -> list[Question]:
    """VQAv2 / OK-VQA question + annotation files; COCO val2014 image names."""
    (questions_data, questions_path), (annotations_data, annotations_path) = files
    annotations = {}
    for i, entry in enumerate(
        require_field(annotations_data, "annotations", list, f"VQA annotation file {annotations_path}")
    ):
        where = f"{annotations_path} annotations[{i}]"
        annotations[require_field(entry, "question_id", int, where)] = (entry, where)
    questions = []
    for i, entry in enumerate(require_field(questions_data, "questions", list, f"VQA question file {questions_path}")):
        where = f"{questions_path} questions[{i}]"
        question_id = require_field(entry, "question_id", int, where)
        image_id = require_field(entry, "image_id", int, where)
        if question_id not in annotations:
            raise ValueError(f"{where}: question {question_id} has no entry in {annotations_path}")
        annotation, annotation_where = annotations[question_id]
        if annotation.get("image_id") != image_id:
            raise ValueError(
                f"{where}: image {image_id} differs from {annotation_where}'s {annotation.get('image_id')}"
            )
        questions.append(
            Question(
                str(question_id),
                question_id,
                require_field(entry, "question", str, where),
                f"COCO_val2014_{image_id:012d}.jpg",
                _answer_dicts(annotation, annotation_where),
                annotation.get("answer_type"),
            )
        )
    return questions


def _read_textvqa(files: list[tuple[Any, Path]]) -> list[Question]:
    """TextVQA ``TextVQA_0.5.1_val.json``: answers are plain strings; image ``<image_id>.jpg``."""
    ((data, path),) = files
    questions = []
    for i, entry in enumerate(require_field(data, "data", list, f"TextVQA file {path}")):
        where = f"{path} data[{i}]"
        question_id = require_field(entry, "question_id", (int, str), where)
        answers = require_field(entry, "answers", list, where)
        if not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{where}: 'answers' must be a list of strings")
        image_id = require_field(entry, "image_id", str, where)
        question = require_field(entry, "question", str, where)
        questions.append(Question(str(question_id), question_id, question, f"{image_id}.jpg", tuple(answers), None))
    return questions


def _read_vizwiz(files: list[tuple[Any, Path]]) -> list[Question]:
    """VizWiz ``val.json``: one question per image; the image name is the id."""
    ((data, path),) = files
    if not isinstance(data, list):
        raise ValueError(f"VizWiz file {path} must be a JSON list of questions")
    questions = []
    for i, entry in enumerate(data):
        where = f"{path}[{i}]"
        image = require_field(entry, "image", str, where)
        question = require_field(entry, "question", str, where)
        questions.append(Question(image, image, question, image, _answer_dicts(entry, where), entry.get("answer_type")))
    return questions


def _vqa_files(prefix: str) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    questions = f"{prefix}OpenEnded_mscoco_val2014_questions.json"
    annotations = f"{prefix}mscoco_val2014_annotations.json"
    return (
        ("--questions", "question file", (questions, f"annotations/{questions}")),
        ("--annotations", "annotation file", (annotations, f"annotations/{annotations}")),
    )


COCO_IMAGE_FOLDERS = ("val2014", "images/val2014", "coco/val2014")
BENCHMARKS = {
    b.task: b
    for b in (
        VQABenchmark(
            "vqav2", "VQAv2 val (VQA accuracy)", _vqa_files("v2_"), COCO_IMAGE_FOLDERS, _read_vqa_pair, "vqav2"
        ),
        VQABenchmark("okvqa", "OK-VQA val (VQA accuracy)", _vqa_files(""), COCO_IMAGE_FOLDERS, _read_vqa_pair, "vqav2"),
        VQABenchmark(
            "textvqa",
            "TextVQA val (VQA accuracy)",
            (("--annotations", "TextVQA file", ("TextVQA_0.5.1_val.json", "annotations/TextVQA_0.5.1_val.json")),),
            ("train_images", "train_val_images/train_images", "images"),
            _read_textvqa,
            "vqav2",
        ),
        VQABenchmark(
            "vizwiz",
            "VizWiz val (VizWiz VQA accuracy)",
            (("--annotations", "VizWiz file", ("val.json", "Annotations/val.json", "annotations/val.json")),),
            ("val", "images/val"),
            _read_vizwiz,
            "vizwiz",
            instruction=VIZWIZ_INSTRUCTION,
            results_id="image",
        ),
    )
}


def question_text(question: str, instruction: str) -> str:
    """The text after the image: the question, the optional instruction, the answer request."""
    return " ".join(part for part in (question.strip(), instruction, PROMPT_AFTER_QUESTION) if part)


def _arguments_for(benchmark: VQABenchmark) -> Callable[[argparse.ArgumentParser], None]:
    def add(parser: argparse.ArgumentParser) -> None:
        add_model_arguments(parser)
        files = [(option, what, names[0]) for option, what, names in benchmark.files]
        add_data_arguments(parser, "question files and images", files)
        add_run_arguments(parser, Path("output") / f"eval-{benchmark.task}")
        add_decoding_arguments(parser, BEAMS, MAX_NEW_TOKENS, MIN_NEW_TOKENS, LENGTH_PENALTY)
        parser.add_argument(
            "--answer-extraction",
            choices=["official", "none"],
            default="official",
            help="official: MM-Interleaved's short-answer extraction before scoring (default); none: the raw text",
        )

    return add


def score_answers(
    questions: list[Question], answers: dict[str, str], protocol: str, extraction: str
) -> tuple[dict[str, Any], dict[str, str]]:
    """VQA accuracy (x100) overall and per answer type, and the scored (extracted) answer of each key."""
    accuracy = vizwiz_accuracy if protocol == "vizwiz" else vqa_accuracy
    scored = {key: extract_short_answer(text) if extraction == "official" else text for key, text in answers.items()}
    per_type: dict[str, list[float]] = {}
    values = []
    for question in questions:
        if question.key not in scored:
            continue
        value = accuracy(scored[question.key], question.answers)
        values.append(value)
        if question.answer_type is not None:
            per_type.setdefault(question.answer_type, []).append(value)
    metrics: dict[str, Any] = {"accuracy": 100.0 * sum(values) / len(values)}
    if per_type:
        metrics["per_answer_type"] = {name: 100.0 * sum(v) / len(v) for name, v in sorted(per_type.items())}
        metrics["questions_per_answer_type"] = {name: len(v) for name, v in sorted(per_type.items())}
    return metrics, scored


def _run(benchmark: VQABenchmark, args: argparse.Namespace) -> int:
    from ..inference.document import Interleaved
    from ..inference.engine import resolve_model_dir

    options = text_options(args)
    paths = [
        find_file(getattr(args, option.lstrip("-")), args.data, names, what, option)
        for option, what, names in benchmark.files
    ]
    files = [(load_json(path, what), path) for path, (_, what, _) in zip(paths, benchmark.files)]
    questions = first_items(benchmark.read(files), args.limit)
    if not questions:
        raise ValueError(f"{paths[0]} holds no questions")
    folder = image_folder(args.images, args.data, benchmark.image_folders)
    settings = {
        "benchmark": benchmark.task,
        "files": [str(path.resolve()) for path in paths],
        "images": str(folder.resolve()),
        "prompt": f"{PROMPT_BEFORE_IMAGE} <image>{question_text('{question}', benchmark.instruction)}",
        "decoding": options.to_dict(),
        "dtype": args.dtype,
        "model": model_record(resolve_model_dir(args.model), embedded=args.model is None),
    }
    run = RunFolder(args.out, settings, overwrite=args.overwrite)
    done = run.done_keys()
    require_some_images(folder, [q.file for q in questions if q.key not in done])
    missing = any(q.key not in done for q in questions)
    engine, _, load_seconds = load_engine(args) if missing else (None, None, 0.0)

    def answer(question: Question) -> dict[str, Any]:
        picture = load_image(folder, question.file)
        text = question_text(question.question, benchmark.instruction)
        result = engine.generate_text(Interleaved([PROMPT_BEFORE_IMAGE, picture, text]), options)
        return {"question_id": question.question_id, "text": result.text.strip(), "new_tokens": len(result.token_ids)}

    skips, run_seconds = run_pending(
        run, [(q.key, q) for q in questions], answer, benchmark.task, progress=not args.no_progress
    )
    selected = {q.key for q in questions}
    items = [item for item in run.items() if item["key"] in selected]
    start = time.perf_counter()
    metrics, scored = (
        score_answers(questions, {i["key"]: i["text"] for i in items}, benchmark.protocol, args.answer_extraction)
        if items
        else (None, {})
    )
    path = write_outputs(
        run,
        header={"benchmark": benchmark.task, "title": benchmark.title, "metric_scale": "x100 (as in papers)"},
        metrics=metrics,
        items=items,
        selected=len(questions),
        skips=skips,
        settings={
            **settings,
            "limit": args.limit,
            "scoring": f"{benchmark.protocol} toolkit accuracy (leave-one-out over the human answers)",
            "answer_extraction": args.answer_extraction,
            "placement": engine.placement.to_dict() if engine is not None else None,
        },
        predictions=[{benchmark.results_id: i["question_id"], "answer": scored[i["key"]]} for i in items],
        timings={
            "load_seconds": load_seconds,
            "this_run_seconds": run_seconds,
            "scoring_seconds": time.perf_counter() - start,
        },
    )
    if metrics is None:
        print(f"{benchmark.task}: no question could be answered (see 'skipped' in {path})", file=sys.stderr)
        return 1
    print(f"{benchmark.task}: accuracy {metrics['accuracy']:.2f}", file=sys.stderr)
    print(path)
    return 0


def _register(benchmark: VQABenchmark) -> None:
    @eval_task(benchmark.task, benchmark.title, _arguments_for(benchmark))
    def run(args: argparse.Namespace) -> int:
        return _run(benchmark, args)


for _benchmark in BENCHMARKS.values():
    _register(_benchmark)
