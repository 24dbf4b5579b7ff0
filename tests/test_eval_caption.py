"""Captioning benchmarks end to end through the public CLI, on tiny datasets written in each benchmark's real format.

- COCO Karpathy (``dataset_coco.json``, images in ``val2014/``), Flickr30k Karpathy (``dataset_flickr30k.json``,
  ``flickr30k-images/``) and NoCaps (``nocaps_val_4500_captions.json``, ``images/``) with drawn PNG images; the model
  folder is the ``eval_model_dir`` fixture (the embedded model: on this data its scores are whatever they are, so
  the tests check the protocol, the bookkeeping and that the report's scores are those of the saved captions).
- The prompt and decoding the engine receives are the official ones (a spy on ``generate_text``).
- Resume: a rerun with the same ``--out`` generates only the missing images; a changed setting is an error unless
  ``--overwrite``; a killed run's half-written last line is dropped (:class:`RunFolder`).
- Bad input: missing caption file, malformed JSON, a malformed entry, a missing image (counted skip), no image at all.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

from comfy_mm_interleaved.cli import main
from comfy_mm_interleaved.eval.caption import BENCHMARKS, score_captions
from comfy_mm_interleaved.eval.runs import RunFolder, load_json
from comfy_mm_interleaved.inference.document import ImagePart, TextPart
from comfy_mm_interleaved.inference.engine import InterleavedEngine
from helpers_eval import eval_model_dir  # noqa: F401

COLOURS = [(220, 30, 30), (30, 160, 40), (40, 60, 220), (230, 200, 40)]
REFERENCES = [
    ["A red square on a white background.", "A red box."],
    ["A green circle. It is round.", "Green disc on white."],
    ["A blue triangle.", "A blue shape pointing up."],
    ["A yellow square.", "Yellow box on white."],
]


def draw(path: Path, index: int) -> None:
    """A small drawing (size differs per image: the engine resizes to the encoder size itself)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (48 + 8 * index, 40), "white")
    ImageDraw.Draw(image).rectangle([8, 8, 30, 30], fill=COLOURS[index % len(COLOURS)])
    image.save(path)


def karpathy_entry(index: int, filename: str, split: str, filepath: str | None) -> dict[str, Any]:
    sentences = [
        {"tokens": s.lower().rstrip(".").split(), "raw": s, "imgid": index, "sentid": 10 * index + j}
        for j, s in enumerate(REFERENCES[index])
    ]
    entry = {"sentids": [s["sentid"] for s in sentences], "imgid": index, "sentences": sentences, "split": split}
    entry["filename"] = filename
    if filepath is not None:  # COCO only
        entry.update(filepath=filepath, cocoid=500000 + index)
    return entry


def coco_dataset(root: Path) -> Path:
    """dataset_coco.json: a train image first, then 3 test images (val2014 files)."""
    splits = ["train", "test", "test", "test"]
    images = []
    for i, split in enumerate(splits):
        filename = f"COCO_val2014_{500000 + i:012d}.jpg"
        draw(root / "val2014" / filename, i)
        images.append(karpathy_entry(i, filename, split, "val2014"))
    (root / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}), encoding="utf-8")
    return root


def flickr_dataset(root: Path) -> Path:
    images = []
    for i in range(3):
        filename = f"{1000092795 + i}.jpg"
        draw(root / "flickr30k-images" / filename, i)
        images.append(karpathy_entry(i, filename, "test", None))
    (root / "dataset_flickr30k.json").write_text(
        json.dumps({"images": images, "dataset": "flickr30k"}), encoding="utf-8"
    )
    return root


def nocaps_dataset(root: Path) -> Path:
    domains = ["in-domain", "near-domain", "out-domain", "in-domain"]
    images, annotations = [], []
    for i, domain in enumerate(domains):
        file_name = f"{i:04x}a1b2c3d4e5f6.jpg"
        draw(root / "images" / file_name, i)
        images.append(
            {"id": i, "file_name": file_name, "open_images_id": file_name[:-4], "height": 40, "width": 48,
             "coco_url": f"https://example.org/{file_name}", "domain": domain}
        )  # fmt: skip
        annotations += [{"image_id": i, "id": 10 * i + j, "caption": c} for j, c in enumerate(REFERENCES[i])]
    (root / "nocaps_val_4500_captions.json").write_text(
        json.dumps({"images": images, "annotations": annotations}), encoding="utf-8"
    )
    return root


def run_cli(task: str, model: Path, data: Path, out: Path, *extra: str) -> int:
    arguments = ["eval", task, "--model", str(model), "--data", str(data), "--out", str(out)]
    return main([*arguments, "--threads", "1", "--device", "cpu", "--caption-tokenizer", "python", *extra])


def read_items(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "items.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, Any]]:
    """Every (document, options) the engine is asked to continue, passed through to the real engine."""
    calls: list[tuple[Any, Any]] = []
    real = InterleavedEngine.generate_text

    def generate_text(self, doc, options=None, progress=None):
        calls.append((doc, options))
        return real(self, doc, options, progress)

    monkeypatch.setattr(InterleavedEngine, "generate_text", generate_text)
    return calls


def test_coco_caption_end_to_end_protocol_and_resume(eval_model_dir, tmp_path, spy, capsys):  # noqa: F811
    data, out = coco_dataset(tmp_path / "coco"), tmp_path / "out"
    assert run_cli("coco-caption", eval_model_dir, data, out, "--limit", "2") == 0

    # the official prompt and decoding, on the first two *test* images
    assert len(spy) == 2
    for doc, options in spy:
        assert [type(s) for s in doc.segments] == [ImagePart, TextPart] and doc.segments[1].text == "a photo of"
        assert (options.num_beams, options.max_new_tokens, options.min_new_tokens) == (5, 20, 7)
        assert (options.length_penalty, options.do_sample, options.stop_on_image) == (1.0, False, True)
    items = read_items(out)
    assert [item["image_id"] for item in items] == [500001, 500002]
    assert all(7 <= item["new_tokens"] <= 20 for item in items)

    report = load_json(out / "report.json", "report")
    assert report["counts"] == {"selected": 2, "evaluated": 2, "skipped_this_run": 0}
    settings = report["settings"]
    assert settings["prompt"] == "<image> a photo of" and settings["split"] == "test"
    assert settings["decoding"]["num_beams"] == 5 and settings["first_sentence_only"] is True
    assert settings["caption_tokenizer"] == "python" and settings["model"]["folder"] == str(eval_model_dir.resolve())
    predictions = load_json(out / "predictions.json", "predictions")
    assert predictions == [{"image_id": i["image_id"], "caption": i["caption"]} for i in items]
    images = BENCHMARKS["coco-caption"].read(load_json(data / "dataset_coco.json", "x"), data, "test")[:2]
    assert report["metrics"] == score_captions(images, {i["key"]: i["caption"] for i in items}, True, "python")

    # resume: only the third test image is generated; the first two lines stay as they were
    spy.clear()
    assert run_cli("coco-caption", eval_model_dir, data, out) == 0
    assert len(spy) == 1
    resumed = read_items(out)
    assert resumed[:2] == items and resumed[2]["image_id"] == 500003
    assert load_json(out / "report.json", "report")["counts"]["evaluated"] == 3

    # a changed decoding setting is refused (before the model loads) unless --overwrite, which starts again
    capsys.readouterr()
    assert run_cli("coco-caption", eval_model_dir, data, out, "--num-beams", "2") == 1
    assert "decoding.num_beams: 5 -> 2" in capsys.readouterr().err
    spy.clear()
    assert run_cli("coco-caption", eval_model_dir, data, out, "--num-beams", "2", "--overwrite", "--limit", "1") == 0
    assert len(spy) == 1 and len(read_items(out)) == 1 and spy[0][1].num_beams == 2


def test_flickr30k_missing_image_is_a_counted_skip(eval_model_dir, tmp_path):  # noqa: F811
    data, out = flickr_dataset(tmp_path / "flickr"), tmp_path / "out"
    (data / "flickr30k-images" / "1000092796.jpg").unlink()
    assert run_cli("flickr30k", eval_model_dir, data, out, "--num-beams", "2", "--max-new-tokens", "8") == 0
    report = load_json(out / "report.json", "report")
    assert report["counts"] == {"selected": 3, "evaluated": 2, "skipped_this_run": 1}
    assert report["skipped"]["by_kind"] == {"missing_image": 1}
    assert report["skipped"]["examples"][0]["key"] == "1"  # Karpathy imgid of the missing file
    assert "1000092796.jpg" in report["skipped"]["examples"][0]["reason"]
    assert report["settings"]["first_sentence_only"] is False  # official: whole caption for Flickr30k
    assert set(report["metrics"]) == {"BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "CIDEr"}


def test_nocaps_scores_per_domain(eval_model_dir, tmp_path):  # noqa: F811
    data, out = nocaps_dataset(tmp_path / "nocaps"), tmp_path / "out"
    assert run_cli("nocaps", eval_model_dir, data, out, "--num-beams", "2", "--max-new-tokens", "8") == 0
    report = load_json(out / "report.json", "report")
    assert set(report["metrics"]) == {"overall", "in-domain", "near-domain", "out-domain"}
    items = {i["key"]: i["caption"] for i in read_items(out)}
    images = BENCHMARKS["nocaps"].read(load_json(data / "nocaps_val_4500_captions.json", "x"), data, "val")
    in_domain = [i for i in images if i.domain == "in-domain"]
    assert report["metrics"]["in-domain"] == score_captions(in_domain, items, False, "python")["in-domain"]
    assert report["counts"]["evaluated"] == 4


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("missing", "caption file not found; looked for"),
        ("malformed", "is not valid JSON"),
        ("no_raw", "sentences[0] has no 'raw'"),
        ("no_images", "none of the 3 images to evaluate is in"),
    ],
)
def test_caption_bad_input_is_a_clear_error(eval_model_dir, tmp_path, capsys, breakage, message):  # noqa: F811
    data = coco_dataset(tmp_path / "coco")
    annotation = data / "dataset_coco.json"
    if breakage == "missing":
        annotation.unlink()
    elif breakage == "malformed":
        annotation.write_text('{"images": [', encoding="utf-8")
    elif breakage == "no_raw":
        content = json.loads(annotation.read_text(encoding="utf-8"))
        del content["images"][1]["sentences"][0]["raw"]
        annotation.write_text(json.dumps(content), encoding="utf-8")
    else:
        for path in (data / "val2014").iterdir():
            path.unlink()
    assert run_cli("coco-caption", eval_model_dir, data, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert message in err
    if breakage == "missing":
        assert "dataset_coco.json" in err and "--annotations" in err


def test_run_folder_resume_bookkeeping(tmp_path):
    out = tmp_path / "run"
    run = RunFolder(out, {"a": 1, "nested": {"b": (1, 2)}})
    run.append({"key": "x", "value": 1})
    run.append({"key": "y", "value": 2})
    with (out / "items.jsonl").open("a", encoding="utf-8") as file:
        file.write('{"key": "z", "val')  # a run killed in the middle of a line
    run = RunFolder(out, {"a": 1, "nested": {"b": [1, 2]}})  # tuples and lists are the same setting
    assert run.done_keys() == {"x", "y"}
    run.append({"key": "z", "value": 3})
    assert [i["value"] for i in run.items()] == [1, 2, 3]
    with pytest.raises(ValueError, match=r"nested\.b: \[1, 2\] -> \[1, 3\]"):
        RunFolder(out, {"a": 1, "nested": {"b": [1, 3]}})
    assert RunFolder(out, {"a": 2}, overwrite=True).items() == []
    (out / "items.jsonl").write_text('{"key": "x"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        RunFolder(out, {"a": 2}).items()
    with pytest.raises(TypeError, match="string 'key'"):
        run.append({"value": 1})
    report = RunFolder(out, {"a": 2}, overwrite=True).write_report({"metric": 1.5})
    assert load_json(report, "report") == {"metric": 1.5} and not list(out.glob("*.tmp"))
    with pytest.raises(FileNotFoundError, match="VQA question file not found"):
        load_json(out / "nope.json", "VQA question file")


def test_coco_overrides_and_unreadable_image(eval_model_dir, tmp_path):  # noqa: F811
    # the caption file elsewhere (--annotations) and --images pointing straight at val2014/; one image is corrupt
    data = coco_dataset(tmp_path / "coco")
    annotations = (data / "dataset_coco.json").rename(tmp_path / "karpathy.json")
    (data / "val2014" / "COCO_val2014_000000500002.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    arguments = ["--annotations", str(annotations), "--images", str(data / "val2014"), "--max-new-tokens", "8"]
    assert run_cli("coco-caption", eval_model_dir, tmp_path / "nowhere", out, *arguments) == 0
    report = load_json(out / "report.json", "report")
    assert report["counts"] == {"selected": 3, "evaluated": 2, "skipped_this_run": 1}
    assert report["skipped"]["by_kind"] == {"unreadable_image": 1}
    assert report["settings"]["annotations"] == str(annotations.resolve())
    assert report["settings"]["images"] == str((data / "val2014").resolve())
