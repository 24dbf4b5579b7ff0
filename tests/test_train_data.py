"""Training data: tokenizer layout, sources and formats, packing rules, transforms, bad input, resumable streams."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from comfy_mm_interleaved.inference.document import load_image_file
from comfy_mm_interleaved.tokenizer import (
    ImageSegment,
    TextSegment,
    build_word_tokenizer,
    encode_document,
    load_tokenizer,
)
from comfy_mm_interleaved.train.documents import BadInput
from comfy_mm_interleaved.train.images import center_crop, load_image
from comfy_mm_interleaved.train.packing import Packer, collate_rows, nearest_bos_indices
from comfy_mm_interleaved.train.sources import SourceConfig, expand_braces, get_format
from comfy_mm_interleaved.train.stream import StreamConfig, TrainStream
from conftest import golden_dir, load_case
from test_train_helpers import WORDS, interleaved_corpus, make_image, tiny_config, write_jsonl

CONFIG = tiny_config(num_img_token=4)  # the hand-counted row lengths below assume 4 image tokens
SPECIAL = CONFIG.special_tokens
N_IMG = CONFIG.num_img_token


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(WORDS, SPECIAL, CONFIG.orig_vocab_size)


def wid(tok, text: str) -> list[int]:
    ids = [tok.convert_tokens_to_ids(w) for w in text.split()]
    assert tok.unk_token_id not in ids, text
    return ids


def image_run() -> list[int]:
    return [SPECIAL.boi_token_id] + [SPECIAL.image_token_id] * N_IMG


def stream_cfg(sources: list[SourceConfig], **kw) -> StreamConfig:
    base = dict(seq_len=32, batch_size=2, num_img_token=N_IMG, encoder_image_size=32, decoder_image_size=16)
    return StreamConfig(sources=sources, **{**base, **kw})


def take(stream, n: int) -> list[dict]:
    out = []
    for batch in stream:
        out.append(batch)
        if len(out) == n:
            return out
    raise AssertionError("stream ended")


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_document_layout_strips_spaces_around_images_and_marks_prompt_tokens(tok) -> None:
    doc = encode_document(tok, ["a red square . ", ImageSegment("x"), " then it is blue"], SPECIAL, N_IMG)
    assert doc.ids == [1] + wid(tok, "a red square .") + image_run() + wid(tok, "then it is blue") + [2]
    assert doc.loss_mask == [1] * len(doc.ids)
    sft = encode_document(
        tok, [ImageSegment("x"), TextSegment("what colour is it ?", loss=False), TextSegment("red")], SPECIAL, N_IMG
    )
    assert sft.ids == [1] + image_run() + wid(tok, "what colour is it ? red") + [2]
    assert sft.loss_mask == [0] * (1 + len(image_run()) + 5) + [1, 1]


def test_word_tokenizer_saves_and_reloads_locally(tok, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok", SPECIAL)
    image_ids = [SPECIAL.boi_token_id, SPECIAL.image_token_id]
    assert again.encode("a red <|beginofimage|><|image|>", add_special_tokens=False) == wid(tok, "a red") + image_ids
    wrong = type(SPECIAL)(pad_token_id=SPECIAL.pad_token_id, boi_token_id=70, image_token_id=71)
    with pytest.raises(ValueError, match="special tokens"):
        load_tokenizer(tmp_path / "tok", wrong)
    with pytest.raises(FileNotFoundError, match="local folder"):
        load_tokenizer(tmp_path / "missing", SPECIAL)


# ---------------------------------------------------------------------------------------------------------------
# Packing


def doc_of(tok, *parts) -> object:
    return encode_document(tok, [ImageSegment(p[1:]) if p.startswith("@") else p for p in parts], SPECIAL, N_IMG)


def test_sample_packing_keeps_documents_whole_and_skips_over_long_ones(tok) -> None:
    packer = Packer(24, SPECIAL, N_IMG, truncation="sample")
    d1 = doc_of(tok, "a red", "@i1")  # 1+2+5+1 = 9 tokens
    d2 = doc_of(tok, "@i2", "it is big")  # 10 tokens
    d3 = doc_of(tok, "@i3", "a blue circle")  # 10 tokens -> no longer fits (29 > 24)
    assert packer.push(d1) == [] and packer.push(d2) == []
    (row,) = packer.push(d3)
    assert [f.ids for f in row.fragments] == [tuple(d1.ids), tuple(d2.ids)]
    assert [im.source for f in row.fragments for im in f.images] == ["i1", "i2"]
    with pytest.raises(Exception, match="over_long_document"):
        packer.push(doc_of(tok, "a big red", "@a", "@b", "@c", "@d"))  # 1 + 3 + 4 * 5 + 1 = 25 > 24 tokens
    (last,) = packer.flush()
    assert last.fragments[0].ids == tuple(d3.ids)


def test_image_truncation_continues_documents_but_never_splits_an_image(tok) -> None:
    packer = Packer(16, SPECIAL, N_IMG, truncation="image")
    doc = doc_of(tok, "a red square .", "@i1", "then it is blue .", "@i2", "the end")
    # 1 + 4 + 5 + 5 + 5 + 2 + 1 = 23 tokens; row 1 = 16 tokens would cut image 2 (BOI at 15) -> cut at 15
    rows = packer.push(doc)
    assert len(rows) == 1
    assert rows[0].fragments[0].ids == tuple(doc.ids[:15])
    assert [im.source for im in rows[0].fragments[0].images] == ["i1"]
    (rest,) = packer.flush()
    assert rest.fragments[0].ids == tuple(doc.ids[15:])  # continues without a new <s>
    assert [im.source for im in rest.fragments[0].images] == ["i2"]
    # at most max_images per row: stop right before the BOI of the image that does not fit
    capped = Packer(64, SPECIAL, N_IMG, truncation="image", max_images=1)
    two = doc_of(tok, "@a", "red", "@b", "blue")
    (first,) = capped.push(two)
    assert first.fragments[0].ids == tuple(two.ids[: 1 + 5 + 1])


def test_nearest_bos_matches_the_official_pipeline_on_the_golden_batch_parity() -> None:
    case = load_case("forward")
    text_ids = case["in.text_ids"].long()
    golden = json.loads((golden_dir() / "tiny_config.json").read_text(encoding="utf-8"))
    tokens = golden["special_tokens"]
    got = [
        i for row in text_ids.tolist() for i in nearest_bos_indices(row, tokens["bos_token_id"], tokens["boi_token_id"])
    ]
    assert got == case["in.nearest_bos_idxs"].tolist()


def test_collate_builds_the_model_batch(tok) -> None:
    d1, d2 = doc_of(tok, "a red", "@i1"), doc_of(tok, "@i2", "big")
    red, blue = torch.zeros(3, 4, 4), torch.ones(3, 2, 2)
    rows = [(d1.ids + d2.ids, d1.loss_mask + d2.loss_mask), ([1, 2], [0, 1])]
    batch = collate_rows(rows, [[(red, blue), (red, blue)], []], 24, SPECIAL, "mmc4")
    assert batch["text_ids"].shape == (2, 24)
    assert batch["text_ids"][0, 17:].tolist() == [SPECIAL.pad_token_id] * 7  # 9 + 8 real tokens
    assert batch["attention_mask"].sum(1).tolist() == [17, 2]
    assert batch["num_image_per_seq"].tolist() == [2, 0]
    assert batch["nearest_bos_idxs"].tolist() == [0, 9]  # second document starts at position 9
    assert batch["image_tensors"].shape == (2, 3, 4, 4) and batch["image_tensors_dec"].shape == (2, 3, 2, 2)
    assert batch["text_loss_mask"][1, :2].tolist() == [0, 1] and batch["meta"] == {"dataset_name": "mmc4"}


def test_center_crop_follows_the_official_box_halving_and_center_crop() -> None:
    cols = torch.arange(80) // 2 * 4  # after 2x box halving: column j = 4 j exactly
    arr = cols[None, :, None].expand(40, 80, 3).to(torch.uint8).numpy()
    out = center_crop(Image.fromarray(arr), 20)
    assert out.shape == (3, 20, 20)
    expected = (torch.arange(10, 30) * 4).float() / 255
    assert torch.allclose(out[0, 0], expected) and torch.allclose(out[:, 7], out[:, 0])


# ---------------------------------------------------------------------------------------------------------------
# Sources and formats


def parse(fmt: str, raw, seed: int = 0, **opts):
    import random

    return get_format(fmt).parse(raw, random.Random(seed), opts)


def test_shard_brace_expansion() -> None:
    assert expand_braces("s{008..010}.tar") == ["s008.tar", "s009.tar", "s010.tar"]
    assert expand_braces("{a,b}/{0..1}") == ["a/0", "a/1", "b/0", "b/1"]


def test_official_formats_become_documents() -> None:
    pair = parse("pairs", "{'image': 'x.jpg', 'caption': 'A Big Dog'}", image_first_prob=1.0)
    assert [type(s).__name__ for s in pair.segments] == ["ImageSegment", "TextSegment"]
    assert pair.segments[1].text == "a big dog"  # lower-cased as in the official LAION pipeline
    annt = {"sentences": ["s0", "s1"], "images": ["a.jpg", "b.jpg"], "sentence_ixs": [0, 1], "image_first": [1, 0]}
    doc = parse("annotation", annt)
    assert [getattr(s, "text", getattr(s, "source", None)) for s in doc.segments] == ["a.jpg", "s0", "s1", "b.jpg"]
    mmc4 = {
        "text_list": ["t0", "t1", "t2"],
        "image_info": [
            {"image_name": "low.jpg", "matched_text_index": 0, "matched_sim": 0.1},
            {"image_name": "b.jpg", "matched_text_index": 2, "matched_sim": 0.3},
            {"image_name": "a.jpg", "matched_text_index": 1, "matched_sim": 0.3},
        ],
    }
    doc = parse("mmc4", json.dumps(mmc4), image_first_prob=1.0)
    order = [getattr(s, "text", getattr(s, "source", None)) for s in doc.segments]
    assert order == ["t0", "a.jpg", "t1", "b.jpg", "t2"]  # similarity filter, images before their sentence
    llava = {
        "id": "1",
        "image": "c.jpg",
        "conversations": [{"from": "human", "value": "<image>\nwhat colour ?"}, {"from": "gpt", "value": "red"}],
    }
    doc = parse("llava", llava, user_template="{text}", answer_template="{text}")
    assert [(getattr(s, "text", None), getattr(s, "loss", None)) for s in doc.segments] == [
        (None, None),
        ("what colour ?", False),
        ("red", True),
    ]


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for name, data in sample.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def png_bytes(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_webdataset_shards_stream_pairs_and_interleaved_documents(tok, tmp_path: Path) -> None:
    doc = {"segments": ["a red square", {"image": "0.png"}, "then it is blue", {"image": "1.png"}]}
    shard = write_tar(
        tmp_path / "s0.tar",
        [
            {"p0.png": png_bytes((255, 0, 0)), "p0.txt": b"A Red Square"},
            {"d0.json": json.dumps(doc).encode(), "d0.0.png": png_bytes((255, 0, 0)), "d0.1.png": png_bytes((0, 0, 9))},
        ],
    )
    source = SourceConfig("wds", f"pipe:cat {shard}", options={"image_first_prob": 1.0})
    (batch,) = take(TrainStream(stream_cfg([source], seq_len=40, batch_size=1), tok, SPECIAL), 1)
    pair = [1] + image_run() + wid(tok, "a red square") + [2]
    interleaved = [1] + wid(tok, "a red square") + image_run() + wid(tok, "then it is blue") + image_run() + [2]
    assert batch["text_ids"][0, : len(pair) + len(interleaved)].tolist() == pair + interleaved  # packed in one row
    assert batch["num_image_per_seq"].tolist() == [3] and batch["nearest_bos_idxs"].tolist() == [0, 10, 10]
    assert batch["image_tensors"][2, 2].mean() == pytest.approx(9 / 255) and batch["image_tensors"][1, 0].min() == 1


# ---------------------------------------------------------------------------------------------------------------
# Bad input: skipped with counted warnings, never a crash


def test_bad_input_is_skipped_and_counted(tok, tmp_path: Path) -> None:
    good = make_image(tmp_path / "good.png", "red")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    records = [
        {"segments": ["a red square", {"image": good}]},
        {"segments": ["a blue", {"image": "corrupt.png"}]},  # corrupt image
        "{not json",  # malformed line
        {"segments": ["it is", {"image": "missing.png"}]},  # missing file
        {"segments": []},  # empty document
        {"segments": [" ".join(["big"] * 40), {"image": good}]},  # over-long document
        {"segments": ["the end", {"image": good}]},
    ]
    source = SourceConfig(
        "interleaved", str(write_jsonl(tmp_path / "bad.jsonl", records)), image_root=str(tmp_path), truncation="sample"
    )
    stream = TrainStream(stream_cfg([source], seq_len=16, batch_size=1, shuffle_shards=False), tok, SPECIAL)
    batches = take(stream, 5)  # the stream loops over epochs: no crash
    skipped: dict[str, int] = {}
    for b in batches:
        for k, v in b["_skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
    # 4 rows per epoch (3 documents dropped while packing, 2 more when their image fails): 5 batches = 1 epoch + 1
    reasons = ["malformed_json", "empty_document", "over_long_document", "corrupt_image", "missing_file"]
    assert skipped == {f"interleaved/{r}": 1 for r in reasons}
    texts = [b["text_ids"][0][b["attention_mask"][0].bool()].tolist() for b in batches[:4]]
    assert [1] + wid(tok, "a red square") + image_run() + [2] in texts
    assert all(t == [] or t[0] == 1 for t in texts)  # rows whose only document was dropped are empty


# ---------------------------------------------------------------------------------------------------------------
# Resume and rank split


def mixture(tmp_path: Path) -> list[SourceConfig]:
    corpus = interleaved_corpus(tmp_path / "c")
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl",
        [{"image": f"d{i}a.png", "caption": f"a big {['red', 'blue'][i % 2]} shape"} for i in range(10)],
    )
    return [
        SourceConfig("interleaved", str(corpus), image_root=str(tmp_path / "c"), truncation="image"),
        SourceConfig("pairs", str(pairs), image_root=str(tmp_path / "c"), weight=0.5),
    ]


def same_batch(a: dict, b: dict) -> bool:
    keys = ["text_ids", "attention_mask", "image_tensors", "num_image_per_seq", "nearest_bos_idxs"]
    return all(torch.equal(a[k], b[k]) for k in keys) and a["meta"] == b["meta"]


def test_stream_resumes_exactly_from_any_batch_state(tok, tmp_path: Path) -> None:
    cfg = stream_cfg(mixture(tmp_path), shuffle_block=4)
    reference = take(TrainStream(cfg, tok, SPECIAL), 14)  # several epochs of both sources
    assert {b["meta"]["dataset_name"] for b in reference} == {"interleaved", "laion_en"}
    for k in (0, 3, 8):
        state = json.loads(json.dumps(reference[k]["_state"]))  # the checkpoint stores it as JSON
        resumed = take(TrainStream(cfg, tok, SPECIAL, state=state), 4)
        assert all(same_batch(a, b) for a, b in zip(resumed, reference[k + 1 : k + 5]))


def test_two_ranks_see_the_rows_of_one_process_with_double_batch(tok, tmp_path: Path) -> None:
    sources = mixture(tmp_path)
    ranks = [
        take(TrainStream(stream_cfg(sources, batch_size=1), tok, SPECIAL, rank=r, world_size=2), 3) for r in (0, 1)
    ]
    assert [b["_state"]["round"] for b in ranks[1]] == [1, 2, 3]
    # round i of 2 ranks x 1 row = the 2 rows of round i of one process with 2 rows per round
    double = take(TrainStream(stream_cfg(sources, batch_size=2), tok, SPECIAL), 3)
    for i in range(3):
        both = torch.cat([ranks[0][i]["text_ids"], ranks[1][i]["text_ids"]])
        assert torch.equal(both, double[i]["text_ids"])
        imgs = torch.cat([ranks[0][i]["image_tensors"], ranks[1][i]["image_tensors"]])
        assert torch.equal(imgs, double[i]["image_tensors"])


def test_streams_without_decoder_images_leave_out_the_image_loss_inputs(tok, tmp_path: Path) -> None:
    source = SourceConfig("interleaved", str(interleaved_corpus(tmp_path, 2)), image_root=str(tmp_path))
    (batch,) = take(TrainStream(stream_cfg([source], decoder_images=False), tok, SPECIAL), 1)
    assert batch["image_tensors_dec"] is None  # the model then computes no image loss
    assert batch["image_tensors"].shape == (int(batch["num_image_per_seq"].sum()), 3, 32, 32)


def test_training_reads_image_files_as_inference_does(tmp_path: Path) -> None:
    """Alpha onto white and 16-bit scaled to 8 bits, in both: a model trains on the pixels it later sees."""
    rgba = Image.new("RGBA", (5, 3), (0, 0, 255, 100))
    gray16 = Image.new("I;16", (5, 3))
    gray16.putpixel((0, 0), 40000)
    for name, image, pixel in (("rgba.png", rgba, (155, 155, 255)), ("gray16.png", gray16, (156, 156, 156))):
        image.save(tmp_path / name)
        trained, used = load_image(name, tmp_path), load_image_file(tmp_path / name)
        assert trained.mode == used.mode == "RGB" and trained.getpixel((0, 0)) == pixel
        assert trained.tobytes() == used.tobytes()
        assert load_image((tmp_path / name).read_bytes()).tobytes() == used.tobytes()
    with pytest.raises(BadInput):
        load_image(Image.new("F", (2, 2)))  # 32-bit float pixels: no unambiguous 8-bit reading
