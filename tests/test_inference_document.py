"""``Interleaved`` documents: conversions of every image kind, JSON / JSONL / official annotation, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfy_mm_interleaved.inference import ImagePart, Interleaved, TextPart, load_documents
from comfy_mm_interleaved.inference.document import document_files, image_key, load_document, tensor_to_images, to_rgb
from test_inference_support import noise_image, solid_image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


# ------------------------------------------------------------------------------------------------------------
# image conversions
def test_transparent_images_are_composited_on_white() -> None:
    rgba = Image.new("RGBA", (4, 3), (200, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent -> white
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half transparent black over white
    rgb = to_rgb(rgba)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 0)) == (127, 127, 127)
    assert rgb.getpixel((2, 2)) == (200, 0, 0)
    gray_alpha = Image.new("LA", (2, 2), (10, 0))
    assert to_rgb(gray_alpha).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 9, 8, 7] + [0] * 762)
    palette.info["transparency"] = 0
    assert to_rgb(palette).getpixel((0, 0)) == (9, 8, 7)


def test_gray_and_sixteen_bit_images_are_converted() -> None:
    assert to_rgb(Image.new("L", (2, 2), 77)).getpixel((1, 1)) == (77, 77, 77)
    sixteen = Image.fromarray(np.array([[0, 257 * 100], [65535, 128]], dtype=np.uint16))
    assert sixteen.mode.startswith("I")
    rgb = to_rgb(sixteen)
    assert [rgb.getpixel((x, y))[0] for y in range(2) for x in range(2)] == [0, 100, 255, 0]
    too_wide = Image.fromarray(np.array([[70000]], dtype=np.int32))
    with pytest.raises(ValueError, match="0..65535"):
        to_rgb(too_wide)
    with pytest.raises(ValueError, match="mode 'F'"):
        to_rgb(Image.new("F", (2, 2), 0.5))


def test_comfyui_tensors_become_images() -> None:
    batch = torch.zeros(2, 3, 5, 3)
    batch[0, 0, 0] = torch.tensor([1.0, 0.5, 0.2])
    batch[1] = 1.0
    images = tensor_to_images(batch)
    assert [i.size for i in images] == [(5, 3), (5, 3)]
    # official rounding: x * 255 + 0.5, truncated
    assert images[0].getpixel((0, 0)) == (255, 128, 51)
    assert images[1].getpixel((4, 2)) == (255, 255, 255)
    gray = tensor_to_images(torch.full((3, 5, 1), 0.2))[0]
    assert gray.getpixel((0, 0)) == (51, 51, 51)
    rgba = torch.zeros(2, 2, 4)  # alpha 0 everywhere -> white
    assert tensor_to_images(rgba)[0].getpixel((1, 1)) == (255, 255, 255)
    doc = Interleaved(["two frames", batch])
    assert doc.num_images == 2
    with pytest.raises(ValueError, match=r"\[H, W, C\]"):
        tensor_to_images(torch.zeros(3, 10, 12))  # channels first is not the ComfyUI layout
    with pytest.raises(ValueError, match="NaN"):
        tensor_to_images(torch.full((2, 2, 3), float("nan")))
    with pytest.raises(ValueError, match=r"empty IMAGE batch \(0, 4, 4, 3\)"):
        Interleaved(["nothing", torch.zeros(0, 4, 4, 3)])  # appending nothing silently would hide a wiring mistake


def test_image_key_is_the_pixel_content() -> None:
    a, b = noise_image(1), noise_image(1)
    assert image_key(a) == image_key(b) != image_key(noise_image(2))
    assert ImagePart(a).key == ImagePart(b).key
    assert image_key(solid_image((1, 2, 3), (4, 6))) != image_key(solid_image((1, 2, 3), (6, 4)))


# ------------------------------------------------------------------------------------------------------------
# the document
def test_document_is_immutable_and_readable() -> None:
    doc = Interleaved(["A red square.", solid_image((255, 0, 0))])
    longer = doc.append_text("Then it turns").append_pending_image()
    assert len(doc) == 2 and len(longer) == 4
    assert longer.to_readable_text() == "A red square. <image 1> Then it turns <image 2: pending>"
    assert longer.ends_with_pending_image and longer.num_images == 1
    resolved = longer.append_image(solid_image((0, 0, 255)))
    assert not resolved.ends_with_pending_image and resolved.num_images == 2 and len(resolved) == 4
    assert isinstance(resolved[2], TextPart) and resolved[2].text == "Then it turns"
    with pytest.raises(ValueError, match="only the last segment"):
        Interleaved([None, "text"])
    assert Interleaved(["  ", ""]).is_empty() and Interleaved([]).is_empty()


def test_json_round_trip_writes_relative_pngs(tmp_path: Path) -> None:
    doc = Interleaved(["first", noise_image(3, (30, 20)), TextPart("second", (5, 6)), noise_image(4)])
    path = doc.append_pending_image().to_json(tmp_path / "out" / "story.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data == [
        {"text": "first"},
        {"image": "story-00.png"},
        {"text": "second"},
        {"image": "story-01.png"},
        {"image": None},
    ]
    again = Interleaved.from_json(path)
    assert [s.key for s in again.image_parts] == [s.key for s in doc.image_parts]
    assert again.to_readable_text() == doc.to_readable_text() + " <image 3: pending>"


def test_json_errors_name_the_segment(tmp_path: Path) -> None:
    noise_image(5).save(tmp_path / "a.png")
    cases = {
        "bad_key.json": ([{"text": "x"}, {"picture": "a.png"}], ValueError, "segment 1"),
        "bad_type.json": ([{"text": 3}], ValueError, "segment 0"),
        "not_list.json": ({"text": "x"}, ValueError, "JSON list"),
        "missing.json": ([{"image": "nowhere.png"}], FileNotFoundError, "nowhere.png"),
    }
    for name, (content, error, message) in cases.items():
        (tmp_path / name).write_text(json.dumps(content), encoding="utf-8")
        with pytest.raises(error, match=message):
            Interleaved.from_json(tmp_path / name)
    (tmp_path / "broken.json").write_text("[{", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        Interleaved.from_json(tmp_path / "broken.json")
    (tmp_path / "corrupt.png").write_bytes(b"not an image")
    (tmp_path / "corrupt.json").write_text(json.dumps([{"image": "corrupt.png"}]), encoding="utf-8")
    with pytest.raises(ValueError, match="cannot read image"):
        Interleaved.from_json(tmp_path / "corrupt.json")


def test_official_annotation_import(tmp_path: Path) -> None:
    for name, seed in (("a.png", 1), ("b.png", 2), ("c.png", 3)):
        noise_image(seed).save(tmp_path / name)
    entries = [
        {
            "sentences": ["one.", "two.", "three."],
            "images": ["a.png", "b.png", "c.png"],
            "sentence_ixs": [0, 2, 2],
            "image_first": [True, False, True],
            "generate_mode": "generate_images",
            "num_iter": 3,
        },
        {"sentences": ["A photo of"], "images": ["b.png"], "sentence_ixs": [0], "image_first": [True]},
    ]
    (tmp_path / "annt.json").write_text(json.dumps(entries), encoding="utf-8")
    docs = Interleaved.from_official_annotation(tmp_path / "annt.json")
    assert [d.to_readable_text() for d in docs] == [
        "<image 1> one. two. <image 2> three. <image 3>",
        "<image 1> A photo of",
    ]
    assert [p.key for p in docs[0].image_parts] == [image_key(noise_image(s)) for s in (1, 3, 2)]
    assert docs[0].meta == {"generate_mode": "generate_images", "num_iter": 3} and docs[1].meta == {}
    assert [d.to_readable_text() for d in load_documents(tmp_path / "annt.json")] == [
        d.to_readable_text() for d in docs
    ]
    bad = [{"sentences": ["x"], "images": ["a.png", "b.png"], "sentence_ixs": [0]}]
    with pytest.raises(ValueError, match="entry 0"):
        Interleaved.from_official_annotation(bad, base_dir=tmp_path)
    missing = [{"sentences": ["x"], "images": ["gone.png"], "sentence_ixs": [0], "image_first": [False]}]
    with pytest.raises(FileNotFoundError, match="gone.png"):
        Interleaved.from_official_annotation(missing, base_dir=tmp_path)
    nowhere = [{"sentences": ["x", "y"], "images": ["a.png"], "sentence_ixs": [5], "image_first": [False]}]
    (tmp_path / "nowhere.json").write_text(json.dumps(nowhere), encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"nowhere.json, entry 0: sentence_ixs\[0\] = 5 is not a sentence index \(0 to 1\)"
    ):
        load_documents(tmp_path / "nowhere.json")  # the image would otherwise vanish silently


def test_jsonl_documents(tmp_path: Path) -> None:
    noise_image(6).save(tmp_path / "a.png")
    lines = [
        json.dumps([{"text": "one"}, {"image": "a.png"}]),
        "",
        json.dumps({"segments": ["two", {"image": "a.png"}, {"text": "x", "loss": False}]}),
        json.dumps({"sentences": ["three"], "images": ["a.png"], "sentence_ixs": [0], "image_first": [False]}),
    ]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs = load_documents(tmp_path / "docs.jsonl")
    assert [d.to_readable_text() for d in docs] == ["one <image 1>", "two <image 1> x", "three <image 1>"]
    (tmp_path / "bad.jsonl").write_text(lines[0] + "\n" + "{oops\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        load_documents(tmp_path / "bad.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no document"):
        load_documents(tmp_path / "empty.jsonl")


def test_one_document_of_a_file_reads_only_that_one(tmp_path: Path) -> None:
    noise_image(6).save(tmp_path / "a.png")
    lines = [
        json.dumps([{"text": "first"}, {"image": "a.png"}]),
        json.dumps([{"text": "second"}, {"image": "gone.png"}]),  # broken, but not the one asked for
        json.dumps({"sentences": ["third"], "images": ["a.png"], "sentence_ixs": [0], "image_first": [True]}),
    ]
    (tmp_path / "docs.jsonl").write_text("\n\n".join(lines), encoding="utf-8")
    doc, count = load_document(tmp_path / "docs.jsonl", 2)
    assert (doc.to_readable_text(), count) == ("<image 1> third", 3)
    assert load_document(tmp_path / "docs.jsonl", 0)[0].to_readable_text() == "first <image 1>"
    with pytest.raises(FileNotFoundError, match="gone.png"):
        load_document(tmp_path / "docs.jsonl", 1)
    with pytest.raises(ValueError, match=r"docs.jsonl holds 3 document\(s\), so index 3 does not exist; use 0 to 2"):
        load_document(tmp_path / "docs.jsonl", 3)
    assert document_files(tmp_path / "docs.jsonl", 1) == [tmp_path / "docs.jsonl", tmp_path / "gone.png"]
    assert document_files(tmp_path / "docs.jsonl", 2) == [tmp_path / "docs.jsonl", tmp_path / "a.png"]
    assert document_files(tmp_path / "docs.jsonl", 9) == [tmp_path / "docs.jsonl"]


def test_file_encodings_and_annotation_shapes(tmp_path: Path) -> None:
    noise_image(6).save(tmp_path / "a.png")
    (tmp_path / "bom.json").write_bytes("\ufeff".encode() + json.dumps(["café ☕"]).encode())
    assert load_documents(tmp_path / "bom.json")[0].to_readable_text() == "café ☕"  # Windows editors add a BOM
    (tmp_path / "latin1.json").write_bytes('["caf\xe9"]'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.json is not UTF-8 text .* save it as UTF-8"):
        load_documents(tmp_path / "latin1.json")
    entry = {"sentences": ["one."], "images": ["a.png"], "sentence_ixs": [0], "image_first": [False]}
    (tmp_path / "single.json").write_text(json.dumps(entry), encoding="utf-8")  # one entry, not in a list
    assert load_documents(tmp_path / "single.json")[0].to_readable_text() == "one. <image 1>"
    (tmp_path / "mixed.json").write_text(json.dumps([entry, [{"text": "x"}]]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"mixed.json: entries \[1\] are not official annotation entries"):
        load_documents(tmp_path / "mixed.json")
    (tmp_path / "flag.json").write_text(json.dumps([{**entry, "image_first": True}]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"flag.json, entry 0: 'image_first' must be a list, got bool True"):
        load_documents(tmp_path / "flag.json")


def test_images_outside_the_root_folder_are_refused(tmp_path: Path) -> None:
    inside = tmp_path / "inside"
    (inside / "sub").mkdir(parents=True)
    noise_image(6).save(tmp_path / "secret.png")
    noise_image(7).save(inside / "ok.png")
    cases = {
        "absolute.json": [{"image": str(tmp_path / "secret.png")}],
        "relative.json": [{"image": "../secret.png"}],
        "sub/deeper.json": [{"image": "../../secret.png"}],
    }
    for name, document in cases.items():
        (inside / name).write_text(json.dumps(document), encoding="utf-8")
        load_documents(inside / name)  # without a root: a library user's own files, any path
        with pytest.raises(ValueError, match=r"segment 0: image '.*secret.png' lies outside .*inside; only files"):
            load_documents(inside / name, root=inside)
    (inside / "sub" / "fine.json").write_text(json.dumps([{"image": "../ok.png"}]), encoding="utf-8")
    assert len(load_documents(inside / "sub" / "fine.json", root=inside)[0].images) == 1
    annotation = [{"sentences": ["x"], "images": ["../secret.png"], "sentence_ixs": [0], "image_first": [False]}]
    (inside / "annt.json").write_text(json.dumps(annotation), encoding="utf-8")
    with pytest.raises(ValueError, match="entry 0: image '../secret.png' lies outside"):
        load_document(inside / "annt.json", 0, root=inside)
