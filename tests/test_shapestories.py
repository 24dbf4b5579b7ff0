"""ShapeStories: determinism, the text and change rules, splits, rendering, the scorer and the metrics."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_mm_interleaved.shapestories import generate as gen
from comfy_mm_interleaved.shapestories import score
from comfy_mm_interleaved.shapestories.contact_sheet import contact_sheet
from comfy_mm_interleaved.shapestories.render import render, render_array
from comfy_mm_interleaved.shapestories.rules import Attributes

SIZE = r"(small|large)"
COLOUR = r"(red|yellow|green|cyan|blue|magenta)"
SHAPE = r"(circle|square|triangle)"
CELL = r"(top|middle|bottom) (left|center|right)"
CAPTION = rf"a {SIZE} {COLOUR} {SHAPE} at {CELL}\."
CHANGE = rf"(it turns {COLOUR}\.|it moves to {CELL}\.|it becomes a {SHAPE}\.|it grows\.|it shrinks\.)"
DOCUMENT_TEXT = {
    "caption": re.compile(rf"<image> {CAPTION}"),
    "generation": re.compile(rf"{CAPTION} <image>"),
    "story": re.compile(rf"<image> {CAPTION}( {CHANGE} <image>)+"),
    "question": re.compile(
        rf"<image> (what colour is it\? {COLOUR}\.|what shape is it\? {SHAPE}\.|where is it\? {CELL}\.)"
    ),
}
SENTENCES = re.compile(r"[a-z]+( [a-z]+)*[.?]( [a-z]+( [a-z]+)*[.?])*")


def attrs(shape="circle", colour="red", size="small", row="top", column="left", radius=None, jitter=(0.0, 0.0)):
    radius = {"small": 0.115, "large": 0.19}[size] if radius is None else radius
    return Attributes(shape, colour, size, row, column, radius, jitter)


BLANK = np.zeros((32, 32, 3), dtype=np.uint8)


# ---- determinism ---------------------------------------------------------------------------------------------


def test_same_seed_same_documents_and_pixels_different_seed_differs() -> None:
    first = list(itertools.islice(gen.training_stream(seed=7), 24))
    again = list(itertools.islice(gen.training_stream(seed=7), 24))
    other = list(itertools.islice(gen.training_stream(seed=8), 24))
    assert first == again
    assert first != other and not set(first) & set(other)
    for a, b in zip(first, again):
        for x, y in zip(a.to_interleaved(32), b.to_interleaved(32)):
            assert x.keys() == y.keys()
            if "image" in x:
                assert np.array_equal(np.asarray(x["image"]), np.asarray(y["image"]))
    pixels = [render_array(d.images[0], 32) for d in first]
    assert not all(np.array_equal(p, render_array(d.images[0], 32)) for p, d in zip(pixels, other))
    assert gen.make_split(5, 3) == gen.make_split(5, 3) != gen.make_split(6, 3)


def test_stream_covers_every_kind_and_respects_weights() -> None:
    kinds = [d.kind for d in itertools.islice(gen.training_stream(), 200)]
    assert set(kinds) == set(gen.KINDS)
    only = {d.kind for d in itertools.islice(gen.training_stream(kinds=("caption", "story"), weights=(0, 1)), 50)}
    assert only == {"story"}


# ---- text and change rules -----------------------------------------------------------------------------------


def test_caption_and_change_sentences() -> None:
    a = attrs()
    assert gen.caption(a) == "a small red circle at top left"
    assert gen.caption_sentence(attrs("triangle", "cyan", "large", "bottom", "center")) == (
        "a large cyan triangle at bottom center."
    )
    assert gen.Change("colour", "blue").sentence == "it turns blue."
    assert gen.Change("position", "bottom right").sentence == "it moves to bottom right."
    assert gen.Change("shape", "square").sentence == "it becomes a square."
    assert gen.Change("size", "large").sentence == "it grows."
    assert gen.Change("size", "small").sentence == "it shrinks."


def test_document_texts_follow_the_rules() -> None:
    documents = list(itertools.islice(gen.training_stream(seed=11), 300))
    for document in documents:
        assert DOCUMENT_TEXT[document.kind].fullmatch(document.text), document.text
        texts = [s for s in document.segments if isinstance(s, str)]
        assert all(SENTENCES.fullmatch(t) and t.endswith(".") for t in texts), texts
        # adjacent sentences share one text segment: texts and images alternate
        kinds = [isinstance(s, str) for s in document.segments]
        assert all(a != b for a, b in zip(kinds, kinds[1:]))
        assert len(document.changes) == (len(document.images) - 1 if document.kind == "story" else 0)
    words = {w for d in documents for s in d.segments if isinstance(s, str) for w in re.sub(r"[.?]", " ", s).split()}
    assert words == set(gen.WORDS)
    assert len(gen.WORDS) == 31  # a at it to is, 2 sizes, 6 colours, 3 shapes, 6 grid words, 5 verbs, 4 question words
    story = gen.Document(
        "story",
        (attrs(), "a small red circle at top left. it turns blue.", attrs(colour="blue")),
        (gen.Change("colour", "blue"),),
    )
    assert story.text == "<image> a small red circle at top left. it turns blue. <image>"
    items = story.to_interleaved(32)
    assert [list(i) for i in items] == [["image"], ["text"], ["image"]]
    assert items[1]["text"] == "a small red circle at top left. it turns blue."
    assert items[0]["image"].size == (32, 32) and items[0]["image"].mode == "RGB"


def test_each_change_keeps_every_other_attribute() -> None:
    rng = np.random.default_rng(0)
    a = attrs(jitter=(0.03, -0.02))
    turned = gen.apply_change(a, gen.Change("colour", "blue"), rng)
    assert turned == Attributes("circle", "blue", "small", "top", "left", a.radius, (0.03, -0.02))
    moved = gen.apply_change(a, gen.Change("position", "bottom right"), rng)
    assert moved == Attributes("circle", "red", "small", "bottom", "right", a.radius, (0.03, -0.02))
    assert moved.centre == pytest.approx((0.78, 0.73))
    became = gen.apply_change(a, gen.Change("shape", "triangle"), rng)
    assert became == Attributes("triangle", "red", "small", "top", "left", a.radius, (0.03, -0.02))
    grown = gen.apply_change(a, gen.Change("size", "large"), rng)
    assert (grown.shape, grown.colour, grown.size, grown.position, grown.jitter) == (
        "circle",
        "red",
        "large",
        "top left",
        (0.03, -0.02),
    )
    assert 0.17 <= grown.radius <= 0.21
    shrunk = gen.apply_change(grown, gen.Change("size", "small"), rng)
    assert shrunk.size == "small" and 0.10 <= shrunk.radius <= 0.13
    with pytest.raises(ValueError, match="does not change"):
        gen.apply_change(a, gen.Change("colour", "red"), rng)


def test_random_stories_change_exactly_one_attribute_per_step() -> None:
    stories = gen.make_split(21, 150, kinds=("story",))
    longer = gen.make_split(21, 60, kinds=("story",), max_steps=4)
    assert {len(s.changes) for s in stories} == {1, 2, 3}
    assert max(len(s.changes) for s in longer) == 4
    for story in stories + longer:
        for change, before, after in zip(story.changes, story.images, story.images[1:]):
            old, new = before.labels(), after.labels()
            assert new[change.attribute] == change.value != old[change.attribute]
            assert {k for k in old if old[k] != new[k]} == {change.attribute}
            assert after.jitter == before.jitter
            assert (after.radius == before.radius) == (change.attribute != "size")
    for document in itertools.islice(gen.training_stream(seed=3), 200):
        for image in document.images:
            low, high = {"small": (0.10, 0.13), "large": (0.17, 0.21)}[image.size]
            assert low <= image.radius <= high
            assert all(abs(j) <= 0.04 for j in image.jitter)


# ---- splits --------------------------------------------------------------------------------------------------


def test_fixed_splits_sizes_and_disjointness() -> None:
    test = gen.fixed_split("test")
    validation = gen.fixed_split("validation")
    assert len(test) == 4 * 256 and len(validation) == 4 * 64
    for split, per_kind in ((test, 256), (validation, 64)):
        assert {k: sum(d.kind == k for d in split) for k in gen.KINDS} == dict.fromkeys(gen.KINDS, per_kind)
    training = set(itertools.islice(gen.training_stream(), 2000))
    assert not set(test) & set(validation)
    assert not set(test) & training and not set(validation) & training
    # a smaller split is the head of each kind's block of the full one
    assert gen.fixed_split("test", per_kind=4) == [d for k in gen.KINDS for d in [x for x in test if x.kind == k][:4]]


def test_write_split_writes_pngs_and_jsonl(tmp_path: Path) -> None:
    documents = gen.make_split(9, 2)
    jsonl = gen.write_split(tmp_path, "mini", image_size=32, documents=documents)
    records = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    assert jsonl == tmp_path / "mini.jsonl" and len(records) == len(documents)
    for record, document in zip(records, documents):
        assert record["kind"] == document.kind and record["text"] == document.text
        texts = [s["text"] for s in record["segments"] if "text" in s]
        assert texts == [s for s in document.segments if isinstance(s, str)]
        paths = [s["image"] for s in record["segments"] if "image" in s]
        assert len(paths) == len(document.images) == len(record["images"])
        for path, truth, stored in zip(paths, document.images, record["images"]):
            with Image.open(tmp_path / path) as png:
                assert np.array_equal(np.asarray(png.convert("RGB")), render_array(truth, 32))
            assert stored["colour"] == truth.colour and stored["radius"] == truth.radius
        assert record["changes"] == [c.to_dict() for c in document.changes]
    with pytest.raises(ValueError, match="unknown split"):
        gen.write_split(tmp_path, "train")


# ---- rendering -----------------------------------------------------------------------------------------------


def test_render_square_edges_hand_computed() -> None:
    # half-side 0.85 * 0.2 * 32 = 5.44 px around 16: edges at 10.56 and 21.44 px; sub-pixel centres at k + 1/8 + j/4
    image = render_array(attrs("square", "red", "large", "middle", "center", radius=0.2), 32)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert image[16, 16].tolist() == [230, 40, 40]
    assert image[16, 10].tolist() == [115, 20, 20]  # 2 of 4 sub-columns covered
    assert image[16, 21].tolist() == [115, 20, 20]
    assert image[10, 10].tolist() == [58, 10, 10]  # 1/4: rint(57.5) = 58
    assert image[16, 9].tolist() == [0, 0, 0] and image[16, 22].tolist() == [0, 0, 0]
    assert image[:, :9].max() == 0 and image[:9].max() == 0


def test_render_triangle_apex_and_base_hand_computed() -> None:
    # apex at y = 0.3 * 32 = 9.6 px, base at y = 0.65 * 32 = 20.8 px, half-base 0.19 * 32 = 6.08 px
    image = render_array(attrs("triangle", "red", "large", "middle", "center", radius=0.2), 32)
    assert image[:9].max() == 0
    assert image[9, 15].tolist() == image[9, 16].tolist() == [14, 2, 2]  # 1/16: rint(14.375), rint(2.5)
    assert image[9, 14].max() == 0 and image[9, 17].max() == 0
    assert image[20, 16].tolist() == [172, 30, 30]  # 3 of 4 sub-rows: rint(172.5) = 172
    assert image[21:].max() == 0


def test_render_circle_area_and_pil() -> None:
    a = attrs("circle", "blue", "large", "bottom", "right", radius=0.2, jitter=(0.01, -0.02))
    image = render_array(a, 64)
    coverage = image[:, :, 2].astype(np.float64) / 235
    assert coverage.sum() == pytest.approx(np.pi * (0.2 * 64) ** 2, rel=0.01)
    ys, xs = np.nonzero(image[:, :, 2])
    weights = image[ys, xs, 2].astype(np.float64)
    assert np.average(xs + 0.5, weights=weights) / 64 == pytest.approx(0.76, abs=0.002)
    assert np.average(ys + 0.5, weights=weights) / 64 == pytest.approx(0.73, abs=0.002)
    assert np.array_equal(np.asarray(render(a, 64)), image)


# ---- scorer --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("side", "required"), [(32, 0.99), (64, 1.0)])
def test_scorer_reads_ground_truth_renders(side: int, required: float) -> None:
    rng = np.random.default_rng(2024)
    truths = [gen.random_attributes(rng) for _ in range(300)]
    right = sum(
        all(score.attribute_matches(score.read_image(render_array(a, side)), a.labels()).values()) for a in truths
    )
    print(f"scorer reads {right}/300 = {right / 300:.4f} of ground-truth renders at S={side}")
    assert right / 300 >= required


def test_scorer_edge_cases() -> None:
    assert score.read_image(BLANK) is None
    assert score.attribute_matches(None, attrs().labels()) == dict.fromkeys(score.ATTRIBUTES, False)
    one = render_array(attrs("circle", "red", "large", "top", "left"), 32)
    two = np.maximum(one, render_array(attrs("square", "red", "large", "bottom", "right"), 32))
    assert score.read_image(two) is None
    dim = (one // 4).astype(np.uint8)  # every channel <= 80: no foreground at all
    assert score.read_image(dim) is None
    speck = one.copy()
    speck[30, 30] = (230, 40, 40)  # a single pixel is not a blob of meaningful size
    reading = score.read_image(Image.fromarray(speck))
    assert reading is not None and reading.labels() == attrs("circle", "red", "large").labels()
    with pytest.raises(ValueError, match="uint8"):
        score.read_image(one.astype(np.float32))
    with pytest.raises(ValueError, match="square"):
        score.read_image(one[:, :20])
    with pytest.raises(TypeError, match="PIL image"):
        score.read_image([[0]])


def test_blobs_are_eight_connected() -> None:
    mask = np.zeros((6, 6), dtype=bool)
    mask[0, 0] = mask[1, 1] = mask[2, 2] = True  # one diagonal blob
    mask[4, 4] = mask[4, 5] = True
    found = score.blobs(mask)
    assert [len(rows) for rows, _ in found] == [3, 2]


def test_parse_caption() -> None:
    labels = {"colour": "red", "shape": "circle", "size": "small", "position": "top left"}
    assert score.parse_caption("a small red circle at top left.") == labels
    assert score.parse_caption("a small red circle at top left") is None
    assert score.parse_caption("a small red circle at top  left.") is None
    assert score.parse_caption("A small red circle at top left.") is None
    assert score.parse_caption("A Small red CIRCLE, top   left", strict=False) == labels
    assert score.parse_caption("a blue thing at the right", strict=False) == {"colour": "blue"}


def test_caption_accuracy_hand_computed() -> None:
    truths = [attrs(), attrs("square", "blue", "large", "bottom", "right"), attrs("triangle", "green")]
    predictions = [
        " a small red circle at top left.\n",  # exact (surrounding whitespace ignored)
        "a large red square at bottom right.",  # wrong colour
        "a small green triangle at top left",  # no full stop: not exact, every attribute right
    ]
    metrics = score.caption_accuracy(predictions, truths)
    assert (metrics.exact.correct, metrics.exact.total) == (1, 3)
    assert metrics.exact.ratio == pytest.approx(1 / 3)
    assert {k: (t.correct, t.total) for k, t in metrics.attributes.items()} == {
        "colour": (2, 3),
        "shape": (3, 3),
        "size": (3, 3),
        "position": (3, 3),
    }
    with pytest.raises(ValueError, match="pair up"):
        score.caption_accuracy(predictions[:2], truths)


def test_generation_accuracy_hand_computed() -> None:
    a, b = attrs("square", "green", "large", "middle", "center"), attrs("circle", "yellow", "small", "bottom", "left")
    images = [render(a, 32), render_array(attrs("circle", "blue", "small", "bottom", "left"), 32), BLANK]
    metrics = score.generation_accuracy(images, [a, b, attrs()])
    assert (metrics.all_correct.correct, metrics.all_correct.total) == (1, 3)
    assert {k: t.correct for k, t in metrics.attributes.items()} == {
        "colour": 1,
        "shape": 2,
        "size": 2,
        "position": 2,
    }
    assert {k: t.correct for k, t in metrics.position_parts.items()} == {"row": 2, "column": 2}
    moved = score.generation_accuracy([render(attrs("square", "green", "large", "middle", "left"), 32)], [a])
    assert {k: t.correct for k, t in moved.position_parts.items()} == {"row": 1, "column": 0}
    assert metrics.unreadable == 1


def test_story_consistency_hand_computed() -> None:
    start = attrs("circle", "red", "large", "middle", "center")
    blue = attrs("circle", "blue", "large", "middle", "center")
    stories = [
        # step 1 right; step 2 moves but also changes the shape: not kept
        score.StoryOutput(
            [gen.Change("colour", "blue"), gen.Change("position", "top left")],
            [render(start, 32), render(blue, 32), render(attrs("square", "blue", "large", "top", "left"), 32)],
        ),
        # step 1 unreadable
        score.StoryOutput([gen.Change("size", "small")], [render(start, 32), BLANK]),
        # asked for a triangle, nothing changed: change wrong, the rest kept
        score.StoryOutput([gen.Change("shape", "triangle")], [render(start, 32), render(start, 32)]),
        # step 1 recolours but also changes the shape; step 2 grows consistently with the (wrong) step-1 image
        score.StoryOutput(
            [gen.Change("colour", "blue"), gen.Change("size", "large")],
            [
                render(attrs("circle", "red", "small"), 32),
                render(attrs("triangle", "blue", "small"), 32),
                render(attrs("triangle", "blue", "large"), 32),
            ],
        ),
    ]
    metrics = score.story_consistency(stories)
    pairs = {
        "overall": metrics.overall,
        "changed_right": metrics.changed_right,
        "others_kept": metrics.others_kept,
        **{f"step{k}": t for k, t in metrics.by_step.items()},
        **{f"change_{k}": t for k, t in metrics.by_change.items()},
    }
    assert {k: (t.correct, t.total) for k, t in pairs.items()} == {
        "overall": (2, 6),
        "changed_right": (4, 6),
        "others_kept": (3, 6),
        "step1": (1, 4),
        "step2": (1, 2),
        "change_colour": (1, 2),
        "change_shape": (0, 1),
        "change_size": (1, 2),
        "change_position": (0, 1),
    }
    with pytest.raises(ValueError, match="needs 2 images"):
        score.story_consistency([score.StoryOutput([gen.Change("size", "small")], [BLANK])])

    report = score.ShapeStoriesReport(story=metrics, settings={"image_size": 32})
    data = json.loads(report.to_json())
    assert data["story"]["by_step"]["2"] == {"correct": 1, "total": 2, "ratio": 0.5}
    assert data["story"]["overall"]["ratio"] == pytest.approx(1 / 3)
    assert data["caption"] is None and data["settings"] == {"image_size": 32}
    assert score.Tally().to_dict() == {"correct": 0, "total": 0, "ratio": None}


# ---- contact sheet and bad input -----------------------------------------------------------------------------


def test_contact_sheet(tmp_path: Path) -> None:
    story = gen.make_split(4, 1, kinds=("story",))[0]
    output = [{"text": "a small red circle at top left."}, {"image": render(attrs(), 32)}]
    sheet = contact_sheet([story, output], image_size=32, cell=64, path=tmp_path / "sheet.png")
    assert sheet.mode == "RGB" and sheet.width >= 64 * len(story.images)
    with Image.open(tmp_path / "sheet.png") as saved:
        assert saved.size == sheet.size
    colours = {tuple(c) for c in np.asarray(sheet).reshape(-1, 3).tolist()}
    assert (230, 40, 40) in colours and (0, 0, 0) in colours
    with pytest.raises(ValueError, match="'text'"):
        contact_sheet([[{"video": 1}]])


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="unknown colour 'purple'"):
        attrs(colour="purple")
    with pytest.raises(ValueError, match="outside the small range"):
        attrs(radius=0.2)
    with pytest.raises(ValueError, match="jitter"):
        attrs(jitter=(0.05, 0.0))
    with pytest.raises(ValueError, match="unknown document kind"):
        gen.make_document("poem", np.random.default_rng(0))
    with pytest.raises(ValueError, match="min_steps"):
        gen.make_document("story", np.random.default_rng(0), min_steps=3, max_steps=2)
    with pytest.raises(ValueError, match="cannot have 1 changes"):
        gen.Document("caption", (attrs(), "a small red circle at top left."), (gen.Change("colour", "blue"),))
    with pytest.raises(TypeError, match="segment"):
        gen.Document("caption", (np.zeros(3), "x."))
    with pytest.raises(ValueError, match="unknown row"):
        gen.Change("position", "up left")
    with pytest.raises(ValueError, match="image size"):
        render(attrs(), 4)
    with pytest.raises(ValueError, match="weights"):
        next(gen.training_stream(weights=(1, 2)))
