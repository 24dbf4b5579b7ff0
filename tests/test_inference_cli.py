"""``python -m comfy_mm_interleaved generate`` end to end in a subprocess on the tiny model folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import REPO_ROOT
from test_inference_support import model_dir, noise_image, ordinary_ids, tiny_config, words  # noqa: F401


def run_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "comfy_mm_interleaved", "generate", *args]
    env = {**os.environ, "MMI_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env)


def test_cli_generate_writes_ordered_documents_pngs_and_report(model_dir, tmp_path: Path) -> None:  # noqa: F811
    config = tiny_config()
    noise_image(1, (70, 50)).save(tmp_path / "first.png")
    noise_image(2).save(tmp_path / "second.png")
    documents = [
        [{"text": words(ordinary_ids(config, 3))}, {"image": "first.png"}],
        {"sentences": [words(ordinary_ids(config, 2, 5))], "images": ["second.png"], "sentence_ixs": [0],
         "image_first": [True]},
    ]  # fmt: skip
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in documents) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    result = run_cli(
        "--model", str(model_dir), "--input", str(tmp_path / "docs.jsonl"), "--out", str(out),
        "--max-new-tokens", "3", "--steps", "2", "--max-segments", "2", "--force-image-after-text", "--seed", "4",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "text" in result.stderr and "image" in result.stderr  # the progress bar
    outputs = sorted(p.name for p in out.glob("*.json"))
    assert outputs == ["doc-00000.json", "doc-00001.json", "report.json"]

    first = json.loads((out / "doc-00000.json").read_text(encoding="utf-8"))
    assert first[0] == {"text": words(ordinary_ids(config, 3))}
    assert [list(s) for s in first] == [["text"], ["image"], ["text"], ["image"]]  # text then the forced image
    second = json.loads((out / "doc-00001.json").read_text(encoding="utf-8"))
    assert second[1] == {"text": words(ordinary_ids(config, 2, 5))}
    for doc, source in ((first, "first.png"), (second, "second.png")):
        images = [s["image"] for s in doc if "image" in s]
        assert all(not Path(name).is_absolute() and (out / name).is_file() for name in images)
        original = np.asarray(Image.open(tmp_path / source).convert("RGB"))
        assert np.array_equal(np.asarray(Image.open(out / images[0])), original)
        size = config.image_decoder.image_size
        assert all(Image.open(out / name).size == (size, size) for name in images[1:])

    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert [d["output"] for d in report["documents"]] == ["doc-00000.json", "doc-00001.json"]
    assert report["totals"]["images_generated"] == 2 and report["totals"]["tokens_generated"] >= 1
    assert report["text_options"]["seed"] == 4 and report["image_options"]["seed"] == 4
    assert all(d["seconds"] > 0 and d["seconds_per_image"] > 0 for d in report["documents"])
    assert report["memory"]["process_peak_rss_bytes"] > 0


def test_cli_generate_refuses_an_empty_document(model_dir, tmp_path: Path) -> None:  # noqa: F811
    (tmp_path / "docs.jsonl").write_text('[{"text": "w5"}]\n[]\n', encoding="utf-8")
    result = run_cli("--model", str(model_dir), "--input", str(tmp_path / "docs.jsonl"), "--out", str(tmp_path / "o"))
    assert result.returncode == 1
    assert "document 2 is empty" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_cli_generate_checks_every_document_first_and_names_the_bad_one(model_dir, tmp_path: Path) -> None:  # noqa: F811
    config = tiny_config()
    noise_image(1).save(tmp_path / "a.png")
    too_many = config.llm.mmfs.max_num_images  # one more than the model reads
    documents = [[{"text": words(ordinary_ids(config, 2))}], [{"image": "a.png"}] * too_many]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in documents) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    result = run_cli("--model", str(model_dir), "--input", str(tmp_path / "docs.jsonl"), "--out", str(out))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"docs.jsonl: document 2: the document holds {too_many} images" in result.stderr
    assert not out.exists()  # refused before the first document was generated

    annotation = [{"sentences": ["w5 w6"], "images": [], "sentence_ixs": [], "generate_mode": "generate_videos"}]
    (tmp_path / "annt.json").write_text(json.dumps(annotation), encoding="utf-8")
    result = run_cli("--model", str(model_dir), "--input", str(tmp_path / "annt.json"), "--out", str(out))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "document 1: generate_mode must be one of ['generate_texts', 'generate_images'], got 'generate_videos'" in (
        result.stderr
    )

    args = ("--model", str(model_dir), "--input", str(tmp_path / "docs.jsonl"), "--out", str(out))
    result = run_cli(*args, "--device", "banana")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "unknown device 'banana'" in result.stderr
