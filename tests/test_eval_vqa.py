"""VQA benchmarks end to end through the public CLI, on tiny datasets written in each benchmark's real format.

- VQAv2 (``v2_OpenEnded_mscoco_val2014_questions.json`` + ``v2_mscoco_val2014_annotations.json``, images
  ``val2014/COCO_val2014_<id:012d>.jpg``), OK-VQA (same layout, its own file names), TextVQA
  (``TextVQA_0.5.1_val.json``, ``train_images/<image_id>.jpg``) and VizWiz (``val.json``, ``val/<image>``), with drawn
  PNG images; the model folder is the ``eval_model_dir`` fixture (the embedded model).
- The engine receives the official prompt (VizWiz with its extra sentence) and decoding (a spy on
  ``generate_text``); the report's accuracy is that of the saved answers under the benchmark's official scoring.
- Bad input: missing question file, malformed JSON, a question without an annotation, a missing image (counted).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

from comfy_mm_interleaved.cli import main
from comfy_mm_interleaved.eval.runs import load_json
from comfy_mm_interleaved.eval.text_metrics import extract_short_answer, vizwiz_accuracy, vqa_accuracy
from comfy_mm_interleaved.inference.document import ImagePart, TextPart
from comfy_mm_interleaved.inference.engine import InterleavedEngine
from helpers_eval import eval_model_dir  # noqa: F401

QUESTIONS = ["What colour is the square?", "How many shapes are there?", "Is it red?"]
ANSWERS = [
    ["red"] * 7 + ["dark red", "Red", "orange"],
    ["1", "one", "1", "1", "2", "1", "one", "1", "1", "1"],
    ["yes"] * 10,
]
ANSWER_TYPES = ["other", "number", "yes/no"]
OFFICIAL_BEFORE = "Based on the image, please answer the question."
OFFICIAL_AFTER = "Please provide an accurate answer within one word. The answer is:"
VIZWIZ_SENTENCE = "When the provided information is insufficient, respond with 'Unanswerable'."


def draw(path: Path, index: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (40 + 8 * index, 36), "white")
    ImageDraw.Draw(image).rectangle([6, 6, 26, 26], fill=[(220, 30, 30), (30, 160, 40), (40, 60, 220)][index])
    image.save(path)


def vqa_pair(root: Path, questions_name: str, annotations_name: str) -> Path:
    """VQAv2-layout question and annotation files (OK-VQA uses the same layout)."""
    questions, annotations = [], []
    for i, (question, answers) in enumerate(zip(QUESTIONS, ANSWERS)):
        image_id, question_id = 262148 + i, 2621480 + i
        draw(root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg", i)
        questions.append({"image_id": image_id, "question": question, "question_id": question_id})
        annotations.append(
            {"question_id": question_id, "image_id": image_id, "question_type": "what", "answer_type": ANSWER_TYPES[i],
             "multiple_choice_answer": answers[0],
             "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(answers)]}
        )  # fmt: skip
    info = {"info": {}, "license": {}, "data_subtype": "val2014"}
    (root / questions_name).write_text(
        json.dumps({**info, "task_type": "Open-Ended", "questions": questions}), encoding="utf-8"
    )
    (root / annotations_name).write_text(json.dumps({**info, "annotations": annotations}), encoding="utf-8")
    return root


def vqav2_dataset(root: Path) -> Path:
    return vqa_pair(root, "v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json")


def okvqa_dataset(root: Path) -> Path:
    return vqa_pair(root, "OpenEnded_mscoco_val2014_questions.json", "mscoco_val2014_annotations.json")


def textvqa_dataset(root: Path) -> Path:
    data = []
    for i, (question, answers) in enumerate(zip(QUESTIONS, ANSWERS)):
        image_id = f"{i:03d}0c91397f2fe05"
        draw(root / "train_images" / f"{image_id}.jpg", i)
        data.append(
            {"question": question, "image_id": image_id, "image_classes": ["Shape"], "flickr_original_url": "",
             "flickr_300k_url": "", "image_width": 40, "image_height": 36, "answers": answers,
             "question_tokens": question.lower().split(), "question_id": 34602 + i, "set_name": "val"}
        )  # fmt: skip
    (root / "TextVQA_0.5.1_val.json").write_text(
        json.dumps({"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data}),
        encoding="utf-8",
    )
    return root


def vizwiz_dataset(root: Path) -> Path:
    entries = []
    for i, (question, answers) in enumerate(zip(QUESTIONS, ANSWERS)):
        image = f"VizWiz_val_{i:08d}.jpg"
        draw(root / "val" / image, i)
        entries.append(
            {"image": image, "question": question, "answerable": 1, "answer_type": ANSWER_TYPES[i],
             "answers": [{"answer": a, "answer_confidence": "yes"} for a in answers]}
        )  # fmt: skip
    (root / "val.json").write_text(json.dumps(entries), encoding="utf-8")
    return root


DATASETS: dict[str, Callable[[Path], Path]] = {
    "vqav2": vqav2_dataset,
    "okvqa": okvqa_dataset,
    "textvqa": textvqa_dataset,
    "vizwiz": vizwiz_dataset,
}


def run_cli(task: str, model: Path, data: Path, out: Path, *extra: str) -> int:
    arguments = ["eval", task, "--model", str(model), "--data", str(data), "--out", str(out)]
    return main([*arguments, "--threads", "1", "--device", "cpu", *extra])


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, Any]]:
    calls: list[tuple[Any, Any]] = []
    real = InterleavedEngine.generate_text

    def generate_text(self, doc, options=None, progress=None):
        calls.append((doc, options))
        return real(self, doc, options, progress)

    monkeypatch.setattr(InterleavedEngine, "generate_text", generate_text)
    return calls


@pytest.mark.parametrize("task", sorted(DATASETS))
def test_vqa_end_to_end_official_protocol(task, eval_model_dir, tmp_path, spy):  # noqa: F811
    data, out = DATASETS[task](tmp_path / task), tmp_path / "out"
    assert run_cli(task, eval_model_dir, data, out) == 0

    sentence = f" {VIZWIZ_SENTENCE}" if task == "vizwiz" else ""
    assert len(spy) == len(QUESTIONS)
    for (doc, options), question in zip(spy, QUESTIONS):
        assert [type(s) for s in doc.segments] == [TextPart, ImagePart, TextPart]
        assert doc.segments[0].text == OFFICIAL_BEFORE
        assert doc.segments[2].text == f"{question}{sentence} {OFFICIAL_AFTER}"
        assert (options.num_beams, options.max_new_tokens, options.min_new_tokens) == (3, 10, 0)
        assert (options.length_penalty, options.do_sample, options.stop_on_image) == (0.0, False, True)

    report = load_json(out / "report.json", "report")
    assert report["counts"] == {"selected": 3, "evaluated": 3, "skipped_this_run": 0}
    assert report["settings"]["prompt"] == f"{OFFICIAL_BEFORE} <image>{{question}}{sentence} {OFFICIAL_AFTER}"
    assert report["settings"]["answer_extraction"] == "official"
    items = [json.loads(line) for line in (out / "items.jsonl").read_text(encoding="utf-8").splitlines()]
    accuracy = vizwiz_accuracy if task == "vizwiz" else vqa_accuracy
    scored = [extract_short_answer(item["text"]) for item in items]
    expected = [accuracy(answer, answers) for answer, answers in zip(scored, ANSWERS)]
    assert report["metrics"]["accuracy"] == pytest.approx(100 * sum(expected) / 3, abs=1e-9)
    if task != "textvqa":  # TextVQA has no answer types
        assert report["metrics"]["questions_per_answer_type"] == {"number": 1, "other": 1, "yes/no": 1}
    id_field = "image" if task == "vizwiz" else "question_id"
    predictions = load_json(out / "predictions.json", "predictions")
    assert predictions == [{id_field: item["question_id"], "answer": a} for item, a in zip(items, scored)]


def test_vqa_resume_limit_and_missing_image(eval_model_dir, tmp_path, spy):  # noqa: F811
    data, out = vqav2_dataset(tmp_path / "vqav2"), tmp_path / "out"
    assert run_cli("vqav2", eval_model_dir, data, out, "--limit", "1") == 0
    (data / "val2014" / "COCO_val2014_000000262149.jpg").unlink()
    assert run_cli("vqav2", eval_model_dir, data, out, "--answer-extraction", "none") == 0
    assert len(spy) == 2  # question 1 once, question 2 skipped (no image), question 3 generated on resume
    report = load_json(out / "report.json", "report")
    assert report["counts"] == {"selected": 3, "evaluated": 2, "skipped_this_run": 1}
    assert report["skipped"]["by_kind"] == {"missing_image": 1} and report["skipped"]["examples"][0]["key"] == "2621481"
    assert report["settings"]["answer_extraction"] == "none"  # a scoring option: no new run needed


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("missing_questions", "question file not found; looked for"),
        ("malformed", "is not valid JSON"),
        ("unannotated", "has no entry in"),
        ("explicit_missing", "annotation file not found: "),
    ],
)
def test_vqa_bad_input_is_a_clear_error(eval_model_dir, tmp_path, capsys, breakage, message):  # noqa: F811
    data = vqav2_dataset(tmp_path / "vqav2")
    questions = data / "v2_OpenEnded_mscoco_val2014_questions.json"
    extra: list[str] = []
    if breakage == "missing_questions":
        questions.unlink()
    elif breakage == "malformed":
        questions.write_text("{", encoding="utf-8")
    elif breakage == "unannotated":
        content = json.loads(questions.read_text(encoding="utf-8"))
        content["questions"][0]["question_id"] = 7
        questions.write_text(json.dumps(content), encoding="utf-8")
    else:
        extra = ["--annotations", str(tmp_path / "elsewhere.json")]
    assert run_cli("vqav2", eval_model_dir, data, tmp_path / "out", *extra) == 1
    err = capsys.readouterr().err
    assert message in err
    if breakage == "missing_questions":
        assert "v2_OpenEnded_mscoco_val2014_questions.json" in err and "--questions" in err


def test_vizwiz_file_must_be_a_list(eval_model_dir, tmp_path, capsys):  # noqa: F811
    data = vizwiz_dataset(tmp_path / "vizwiz")
    (data / "val.json").write_text(json.dumps({"images": []}), encoding="utf-8")
    assert run_cli("vizwiz", eval_model_dir, data, tmp_path / "out") == 1
    assert "must be a JSON list of questions" in capsys.readouterr().err
