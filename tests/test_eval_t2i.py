"""``eval coco-t2i`` / ``eval lncoco-t2i`` / ``eval fid`` end to end through the CLI on tiny data in the benchmarks'
real formats (COCO ``captions_val2014.json`` + ``val2014/COCO_val2014_*.jpg``; LN-COCO ``coco_val_captions.jsonl`` +
``val2017/<id:012d>.jpg``), with a random-weight FID Inception converted by ``convert-inception`` and a tiny random
CLIP for the re-ranking path; caption selection against the documented procedure; resume; bad input.

The model folder is the ``eval_model_dir`` fixture: the shipped embedded model.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from comfy_mm_interleaved.cli import main
from comfy_mm_interleaved.eval.t2i import coco_captions, lncoco_captions
from helpers_eval import eval_model_dir  # noqa: F401
from test_eval_fid import convert_with_cli, write_standard_inception_pth

COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle", "circle"]
SIZES = [(80, 60), (64, 64), (50, 90), (72, 70)]  # (width, height): landscape, square, portrait
STEPS = ["--steps", "2", "--no-progress", "--device", "cpu", "--batch-size", "8"]


def _draw(path: Path, index: int) -> None:
    width, height = SIZES[index]
    image = Image.new("RGB", (width, height), (240, 240, 240))
    ImageDraw.Draw(image).ellipse((5, 5, width - 5, height - 5), fill=COLOURS[index])
    image.save(path, quality=95)


# ----------------------------------------------------------------------------------------------------------------
# Fixtures: data, Inception weights, CLIP


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    """COCO root: ``annotations/captions_val2014.json`` (2 captions for each of 4 images) and ``val2014/``."""
    root = tmp_path_factory.mktemp("coco")
    (root / "annotations").mkdir()
    (root / "val2014").mkdir()
    images, annotations = [], []
    for index in range(4):
        image_id = 100 + 7 * index
        name = f"COCO_val2014_{image_id:012d}.jpg"
        _draw(root / "val2014" / name, index)
        width, height = SIZES[index]
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for variant, text in enumerate([f"A {COLOURS[index]} {SHAPES[index]}.", f"a {SHAPES[index]} at the center"]):
            annotations.append({"id": 1000 + 10 * index + variant, "image_id": image_id, "caption": text})
    data = {"info": {}, "licenses": [], "images": images, "annotations": annotations}
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps(data), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def lncoco(tmp_path_factory) -> Path:
    """LN-COCO folder: ``coco_val_captions.jsonl`` (3 narratives of 2 images) and ``val2017/``."""
    root = tmp_path_factory.mktemp("lncoco")
    (root / "val2017").mkdir()
    records = [(139, "a red circle at the left"), (139, "it is red"), (285, "a blue square at the top")]
    for index, image_id in enumerate(sorted({r[0] for r in records})):
        _draw(root / "val2017" / f"{image_id:012d}.jpg", index)
    lines = [
        json.dumps({"dataset_id": "mscoco_val2017", "image_id": str(i), "annotator_id": 1, "caption": c})
        for i, c in records
    ]
    (root / "coco_val_captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inception")
    write_standard_inception_pth(folder / "pt_inception.pth")
    convert_with_cli(folder / "pt_inception.pth", folder / "inception.safetensors")
    return folder / "inception.safetensors"


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny random transformers CLIP folder (model, character-level tokenizer, image processor)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip")
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<|startoftext|>", "<|endoftext|>", "!", *letters, *(f"{c}</w>" for c in letters), ".", ".</w>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!")
    text = {
        "vocab_size": len(tokens),
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 64,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 2,
    }
    vision = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    }
    torch.manual_seed(3)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _items(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "items.jsonl").read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------------------------------------------
# Caption selection


def test_coco_captions_one_caption_per_image_drawn_as_documented(coco):
    data = _read(coco / "annotations" / "captions_val2014.json")
    annotations = sorted((a["image_id"], a["id"], a["caption"]) for a in data["annotations"])
    for seed in (0, 1):
        captions = coco_captions(coco / "annotations" / "captions_val2014.json", 30_000, seed)
        # the documented draw: random.Random(seed).sample of the sorted image ids (all 4 here: fewer than --total),
        # then .choice of one caption of each, in annotation-id order; captions are lower-cased
        rng = random.Random(seed)
        ids = rng.sample(sorted({a[0] for a in annotations}), 4)
        expected = [rng.choice([a[2].lower() for a in annotations if a[0] == i]) for i in ids]
        assert [c.image_id for c in captions] == ids
        assert [c.caption for c in captions] == expected
        assert [c.real_name for c in captions] == [f"COCO_val2014_{i:012d}.jpg" for i in ids]
        assert [c.index for c in captions] == [0, 1, 2, 3]
    limited = coco_captions(coco / "annotations" / "captions_val2014.json", 2, 0)
    assert len({c.image_id for c in limited}) == 2
    # the official selection: the file's first captions, in order
    in_order = coco_captions(coco / "annotations" / "captions_val2014.json", 3, 0, selection="file-order")
    first = data["annotations"][:3]
    assert [(c.image_id, c.caption) for c in in_order] == [(a["image_id"], a["caption"].lower()) for a in first]


def test_lncoco_oversampling_is_image_balanced(lncoco):
    path = lncoco / "coco_val_captions.jsonl"
    first = lncoco_captions(path, 2, 0)
    assert [(c.image_id, c.caption) for c in first] == [(139, "a red circle at the left"), (139, "it is red")]
    captions = lncoco_captions(path, 4003, 0)
    assert [c.caption for c in captions[:3]] == ["a red circle at the left", "it is red", "a blue square at the top"]
    extra = captions[3:]
    # weights 1/2, 1/2, 1 -> probabilities 1/4, 1/4, 1/2; 4000 draws: standard deviations <= 0.008
    share = {text: sum(c.caption == text for c in extra) / len(extra) for text in {c.caption for c in captions}}
    assert share["a blue square at the top"] == pytest.approx(0.5, abs=0.04)
    assert share["it is red"] == pytest.approx(0.25, abs=0.04)
    assert captions[5].real_name == f"{captions[5].image_id:012d}.jpg"
    assert [c.caption for c in lncoco_captions(path, 4003, 0)] == [c.caption for c in captions]  # seeded


# ----------------------------------------------------------------------------------------------------------------
# End to end


def _clip_cosine(clip_dir: Path, image: Image.Image, caption: str) -> float:
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir, local_files_only=True)
    inputs = processor(text=[caption], images=[image], return_tensors="pt", padding=True)
    with torch.no_grad():
        image_embedding = model.get_image_features(pixel_values=inputs["pixel_values"])
        text_embedding = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    image_embedding = getattr(image_embedding, "pooler_output", image_embedding)
    text_embedding = getattr(text_embedding, "pooler_output", text_embedding)
    return float(torch.nn.functional.cosine_similarity(image_embedding, text_embedding)[0])


def test_coco_t2i_end_to_end_clip_reranking_resume(eval_model_dir, coco, inception_file, clip_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    command = [
        "eval", "coco-t2i", "--model", str(eval_model_dir), "--data", str(coco), "--out", str(out),
        "--inception", str(inception_file), "--clip", str(clip_dir), "--samples", "2", "--limit", "3", *STEPS,
    ]  # fmt: skip
    assert main(command) == 0
    assert "gives 4 captions, fewer than --total 30000" in capsys.readouterr().err  # 4 captioned images here
    report = _read(out / "report.json")
    assert report["benchmark"] == "coco-t2i" and report["n_fake"] == 3 and report["n_real"] == 3
    assert report["settings"]["benchmark_size"] == 4 and report["settings"]["total"] == 30_000
    assert math.isfinite(report["fid"]) and report["fid"] > 0  # two different image sets
    assert report["kid_subset_size"] == 3 and report["kid_std"] == pytest.approx(0.0, abs=1e-9)
    sampling = report["settings"]["sampling"]
    assert sampling == {"steps": 2, "guidance_scale": 3.5, "scheduler": "ddpm", "samples": 2, "clip": str(clip_dir)}
    assert report["settings"]["seed"] == 0 and report["settings"]["metric"]["fid_resolution"] == 256
    assert report["model"]["folder"] == str(eval_model_dir.resolve()) and report["code"] is not None
    assert report["timings"]["images_generated"] == 3

    expected = coco_captions(coco / "annotations" / "captions_val2014.json", 30_000, 0)[:3]
    items = _items(out)
    assert [item["key"] for item in items] == ["00000", "00001", "00002"]
    for item, caption in zip(items, expected):
        assert (item["caption"], item["image_id"], item["real"]) == (
            caption.caption,
            caption.image_id,
            caption.real_name,
        )
        assert item["seed"] == 2 * caption.index and len(item["clip_scores"]) == 2
        assert item["chosen"] == max(range(2), key=item["clip_scores"].__getitem__)
        # the kept PNG is the sample CLIP scores best against the caption
        kept = Image.open(out / item["image"]).convert("RGB")
        assert kept.size == (64, 64)
        assert _clip_cosine(clip_dir, kept, item["caption"]) == pytest.approx(max(item["clip_scores"]), abs=1e-4)

    # eval fid on the same two image sets gives the same numbers
    real = tmp_path / "real"
    real.mkdir()
    for caption in expected:
        shutil.copy(coco / "val2014" / caption.real_name, real / caption.real_name)
    fid_out = tmp_path / "fid"
    fid_command = ["eval", "fid", "--real", str(real), "--fake", str(out / "images"), "--out", str(fid_out)]
    assert main([*fid_command, "--inception", str(inception_file), "--device", "cpu"]) == 0
    direct = _read(fid_out / "report.json")
    assert direct["fid"] == pytest.approx(report["fid"], rel=1e-9)
    assert direct["kid_mean"] == pytest.approx(report["kid_mean"], rel=1e-9)
    assert (direct["n_real"], direct["n_fake"]) == (3, 3)
    same = ["eval", "fid", "--real", str(real), "--fake", str(real), "--out", str(fid_out)]
    assert main([*same, "--inception", str(inception_file), "--device", "cpu"]) == 0
    assert abs(_read(fid_out / "report.json")["fid"]) < 1e-6  # a set against itself

    # resume: nothing is generated again, the same report
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    assert main(command) == 0
    again = _read(out / "report.json")
    assert again["timings"]["images_generated"] == 0 and again["timings"]["load_seconds"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == stamps
    assert len(_items(out)) == 3
    for name in ("fid", "kid_mean", "kid_std", "n_real", "n_fake", "settings"):
        assert again[name] == report[name], name

    # another setting in the same folder is an error
    capsys.readouterr()
    assert main([*command[: -len(STEPS)], *STEPS[2:], "--steps", "3"]) == 1
    assert "other settings" in capsys.readouterr().err


def test_lncoco_images_only_then_metrics(eval_model_dir, lncoco, inception_file, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    command = ["eval", "lncoco-t2i", "--model", str(eval_model_dir), "--data", str(lncoco), "--out", str(out)]
    command += ["--total", "5", "--limit", "4", *STEPS]
    assert main([*command, "--images-only"]) == 0
    assert "--inception" in capsys.readouterr().err
    report = _read(out / "report.json")
    assert report["fid"] is None and report["n_fake"] == 4
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:05d}.png" for i in range(4)]
    items = _items(out)
    assert [item["caption"] for item in items[:3]] == [
        "a red circle at the left",
        "it is red",
        "a blue square at the top",
    ]
    assert all(item["clip_scores"] is None and item["chosen"] == 0 for item in items)
    assert [item["seed"] for item in items] == [0, 1, 2, 3]  # seed + index * samples

    # a run killed after the last image was saved but before its item was written: only that image is drawn
    # again, identically (seeded)
    last = out / "images" / "00003.png"
    pixels = Image.open(last).tobytes()
    lines = (out / "items.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (out / "items.jsonl").write_text("".join(lines[:-1]), encoding="utf-8")
    assert main([*command, "--images-only"]) == 0
    assert _read(out / "report.json")["timings"]["images_generated"] == 1
    assert Image.open(last).tobytes() == pixels and len(_items(out)) == 4

    # later: the same command with the Inception weights computes the metrics from the saved images
    assert main([*command, "--inception", str(inception_file), "--fid-resolution", "64"]) == 0
    report = _read(out / "report.json")
    assert report["timings"]["images_generated"] == 0
    assert (report["n_real"], report["n_real_unique"], report["n_fake"]) == (4, 2, 4)  # one real image per caption
    assert report["settings"]["metric"]["fid_resolution"] == 64 and report["fid"] > 0

    # --overwrite starts again from nothing
    assert main([*command, "--images-only", "--limit", "2", "--overwrite"]) == 0
    assert _read(out / "report.json")["timings"]["images_generated"] == 2
    assert sorted(p.name for p in (out / "images").iterdir()) == ["00000.png", "00001.png"]


# ----------------------------------------------------------------------------------------------------------------
# Bad input: clear errors before any model is loaded


def _error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 1
    return capsys.readouterr().err


def test_t2i_bad_input(eval_model_dir, coco, lncoco, inception_file, tmp_path, capsys):  # noqa: F811
    base = ["eval", "coco-t2i", "--model", str(tmp_path), "--out", str(tmp_path / "out"), *STEPS]
    with_inception = [*base, "--inception", str(inception_file)]

    err = _error(capsys, [*base, "--data", str(coco)])
    assert "--inception PATH is required" in err and "convert-inception" in err and "--images-only" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "captions file not found" in _error(capsys, [*with_inception, "--data", str(empty)])

    broken = tmp_path / "broken"
    (broken / "annotations").mkdir(parents=True)
    (broken / "annotations" / "captions_val2014.json").write_text('{"annotations": [', encoding="utf-8")
    assert "is not valid JSON" in _error(capsys, [*with_inception, "--data", str(broken)])

    partial = tmp_path / "partial"
    shutil.copytree(coco, partial)
    first = coco_captions(partial / "annotations" / "captions_val2014.json", 30_000, 0)[0]
    os.remove(partial / "val2014" / first.real_name)
    err = _error(capsys, [*with_inception, "--data", str(partial), "--limit", "2"])
    assert "1 real image(s) missing" in err and first.real_name in err and "--images" in err

    err = _error(capsys, [*with_inception, "--data", str(coco), "--samples", "2"])
    assert "needs --clip" in err

    no_clip = ["eval", "coco-t2i", "--model", str(eval_model_dir), "--data", str(coco), "--images-only", *STEPS]
    no_clip += ["--out", str(tmp_path / "no-clip"), "--clip", str(tmp_path / "clip-missing")]
    err = _error(capsys, no_clip)
    assert "CLIP folder" in err and "does not exist" in err

    missing_weights = [*base, "--data", str(coco), "--inception", str(tmp_path / "none.safetensors")]
    assert "convert-inception" in _error(capsys, missing_weights)

    bad_lines = tmp_path / "bad-lncoco"
    shutil.copytree(lncoco, bad_lines)
    with (bad_lines / "coco_val_captions.jsonl").open("a", encoding="utf-8") as file:
        file.write('{"image_id": "7", "caption": \n')
    lncoco_command = ["eval", "lncoco-t2i", "--model", str(tmp_path), "--data", str(bad_lines), "--images-only"]
    assert "line 4 is not valid JSON" in _error(capsys, lncoco_command)

    fid = ["eval", "fid", "--real", str(coco / "val2014"), "--out", str(tmp_path / "fid")]
    assert "--inception PATH is required" in _error(capsys, [*fid, "--fake", str(coco / "val2014")])
    assert "holds no images" in _error(capsys, [*fid, "--fake", str(empty), "--inception", str(inception_file)])
