"""The embedded model's recipe: its tokenizer, the in-process ShapeStories source, the VAE stage, the line chart and
the three-stage ``train-embedded`` command end to end (a few steps)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from comfy_mm_interleaved.cli import main
from comfy_mm_interleaved.inference.document import Interleaved
from comfy_mm_interleaved.inference.engine import InterleavedEngine
from comfy_mm_interleaved.inference.options import TextOptions
from comfy_mm_interleaved.shapestories import render
from comfy_mm_interleaved.shapestories.embedded import EMBEDDED_WORDS, build_embedded_tokenizer, embedded_config
from comfy_mm_interleaved.shapestories.generate import stream_document, training_stream
from comfy_mm_interleaved.shapestories.plot import line_chart, smooth
from comfy_mm_interleaved.shapestories.rules import Attributes
from comfy_mm_interleaved.shapestories.train_embedded import image_batches, read_metrics
from comfy_mm_interleaved.tokenizer import ImageSegment, TextSegment
from comfy_mm_interleaved.train.autoencoder import (
    AutoencoderTraining,
    latent_scaling_factor,
    reconstruction_error,
    train_autoencoder,
)
from comfy_mm_interleaved.train.export import averaged_weights
from comfy_mm_interleaved.train.sources import SourceConfig, get_format
from comfy_mm_interleaved.train.stream import StreamConfig, TrainStream


@pytest.fixture(scope="module")
def config():
    return embedded_config()


@pytest.fixture(scope="module")
def tok(config):
    return build_embedded_tokenizer(config)


# ---------------------------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_splits_punctuation_lowercases_and_decodes_the_document_form(tok) -> None:
    text = "A Small red circle at top left. what colour is it? red."
    ids = tok.encode(text, add_special_tokens=False)
    words = "a small red circle at top left . what colour is it ? red .".split()
    assert ids == [tok.convert_tokens_to_ids(w) for w in words]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text.lower()


def test_tokenizer_knows_every_word_and_keeps_the_special_ids(tok, config) -> None:
    for word in EMBEDDED_WORDS:
        assert tok.convert_tokens_to_ids(word) != tok.unk_token_id, word
    special = config.special_tokens
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        special.bos_token_id,
        special.eos_token_id,
        special.pad_token_id,
    )
    assert tok.convert_tokens_to_ids("<|beginofimage|>") == special.boi_token_id == config.orig_vocab_size


def test_tokenizer_survives_save_and_load(tok, config, tmp_path: Path) -> None:
    from comfy_mm_interleaved.tokenizer import load_tokenizer

    tok.save_pretrained(str(tmp_path))
    loaded = load_tokenizer(tmp_path, config.special_tokens)
    text = "It turns BLUE."
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.decode(loaded.encode(text, add_special_tokens=False)) == "it turns blue."


# ---------------------------------------------------------------------------------------------------------------
# config


def test_embedded_config_sizes(config) -> None:
    from comfy_mm_interleaved.models.mm_interleaved import MMInterleaved

    decoder = config.image_decoder
    assert decoder.image_size == 64 and config.encoder_image_size == 32
    assert decoder.unet["sample_size"] == decoder.image_size // 2 ** (len(decoder.vae["block_out_channels"]) - 1)
    assert decoder.scheduler["prediction_type"] == "v_prediction"
    model = MMInterleaved(config)
    params = sum(p.numel() for p in model.parameters())
    assert 3e6 < params < 7.5e6  # 4 bytes each: well under the 30 MB budget
    assert model.image_decoder.decoder.latent_shape(64, 64) == (4, 16, 16)


# ---------------------------------------------------------------------------------------------------------------
# the shapestories source


def test_stream_document_is_document_i_of_the_training_stream() -> None:
    stream = training_stream(seed=5, weights=[1, 2, 3, 4])
    for index in range(12):
        assert stream_document(index, seed=5, weights=[1, 2, 3, 4]) == next(stream)


def test_shapestories_source_renders_the_documents() -> None:
    fmt = get_format("shapestories")
    reader = fmt.reader("label")
    options = {"seed": 9, "kinds": ["story"], "max_steps": 2, "image_size": 48}
    for _ in range(3):
        index = next(reader)
        doc = fmt.parse(index, None, options)
        truth = stream_document(index, seed=9, kinds=["story"], max_steps=2)
        assert len(doc.segments) == len(truth.segments)
        for segment, expected in zip(doc.segments, truth.segments):
            if isinstance(expected, Attributes):
                assert isinstance(segment, ImageSegment)
                assert np.array_equal(np.asarray(segment.source), np.asarray(render(expected, 48)))
            else:
                assert segment == TextSegment(expected)


def test_shapestories_source_rejects_unknown_options() -> None:
    with pytest.raises(ValueError, match="unknown options.*colour"):
        get_format("shapestories").parse(0, None, {"colour": "red"})


def test_shapestories_stream_batches_and_resume(tok, config) -> None:
    source = SourceConfig("shapestories", "shapestories", pack=False, options={"seed": 3, "image_size": 64})
    cfg = StreamConfig(
        sources=[source], seq_len=128, batch_size=3, num_img_token=config.num_img_token,
        encoder_image_size=config.encoder_image_size, decoder_image_size=64,
    )  # fmt: skip
    first = iter(TrainStream(cfg, tok, config.special_tokens))
    batches = [next(first) for _ in range(3)]
    assert batches[0]["image_tensors"].shape[1:] == (3, 32, 32)
    assert batches[0]["image_tensors_dec"].shape[1:] == (3, 64, 64)
    assert tok.unk_token_id not in batches[0]["text_ids"].flatten().tolist()
    resumed = next(iter(TrainStream(cfg, tok, config.special_tokens, state=batches[1]["_state"])))
    assert torch.equal(resumed["text_ids"], batches[2]["text_ids"])
    assert torch.equal(resumed["image_tensors_dec"], batches[2]["image_tensors_dec"])


# ---------------------------------------------------------------------------------------------------------------
# VAE stage and report helpers


def test_autoencoder_training_reduces_the_error_and_scales_latents() -> None:
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=4, latent_channels=4,
    )  # fmt: skip
    held_out = next(image_batches(16, 16, seed=1))
    assert held_out.shape == (16, 3, 16, 16) and held_out.min() >= -1 and held_out.max() <= 1
    before = reconstruction_error(vae, held_out)
    rows = train_autoencoder(
        vae, image_batches(8, 16, seed=0), AutoencoderTraining(steps=60, warmup_steps=5, log_every=20)
    )
    assert [r["step"] for r in rows] == [20, 40, 60]
    assert reconstruction_error(vae, held_out) < 0.5 * before
    assert not any(p.requires_grad for p in vae.parameters())
    scale = latent_scaling_factor(vae, held_out, torch.Generator().manual_seed(0))
    latents = vae.encode(held_out).latent_dist.sample(torch.Generator().manual_seed(0))
    assert float((latents * scale).std()) == pytest.approx(1.0, rel=1e-4)


def test_smooth_and_line_chart(tmp_path: Path) -> None:
    assert smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    path = line_chart([(1, 4.0), (2, 3.0), (3, 3.5)], "loss", tmp_path / "c.png")
    image = Image.open(path)
    assert image.size == (640, 360)
    with pytest.raises(ValueError, match="at least one point"):
        line_chart([], "empty", tmp_path / "e.png")


def test_read_metrics(tmp_path: Path) -> None:
    csv = tmp_path / "metrics.csv"
    csv.write_text("step,time,tag,value\n1,0.5,loss,3.0\n1,0.5,lr,0.1\n2,1.0,loss,2.5\n")
    assert read_metrics(csv) == {"loss": [(1, 3.0), (2, 2.5)], "lr": [(1, 0.1)]}
    assert read_metrics(tmp_path / "missing.csv") == {}


def test_averaged_weights(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.tensor([1.0, 2.0]), "n": torch.tensor([3])}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.tensor([3.0, 6.0]), "n": torch.tensor([5])}, str(tmp_path / "b.safetensors"))
    mean = averaged_weights([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    assert mean["w"].tolist() == [2.0, 4.0] and mean["n"].tolist() == [3]


# ---------------------------------------------------------------------------------------------------------------
# the whole command, a few steps


def test_train_embedded_three_stages_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "emb"
    args = ["train-embedded", "--out", str(out), "--vae-steps", "3", "--threads", "1"]
    steps = ["--set", "train.max_steps=2", "--set", "train.save_every=1", "--set", "data.batch_size=2"]
    assert main([*args, *steps]) == 0
    model_dir = out / "model"
    report = json.loads((model_dir / "training_report.json").read_text())
    assert report["steps"] == 2 and report["vae"]["steps"] == 3
    assert set(report["wall_seconds"]) == {"vae", "train"}
    assert report["command"].startswith("python -m comfy_mm_interleaved train-embedded")
    for name in ("loss_text.png", "loss_image.png", "loss_total.png"):
        assert Image.open(model_dir / name).size == (640, 360)
    vae_scale = json.loads((out / "init" / "vae_training.json").read_text())["scaling_factor"]
    engine = InterleavedEngine.from_pretrained(model_dir, device="cpu")
    assert engine.model.image_decoder.decoder.scaling_factor == pytest.approx(vae_scale)
    reply = engine.generate_text(
        Interleaved([render(Attributes("circle", "red", "small", "top", "left", 0.12, (0.0, 0.0)), 64)]),
        TextOptions(max_new_tokens=3),
    )
    assert isinstance(reply.text, str)
    # a rerun skips the finished VAE stage and resumes training from the last checkpoint
    assert main([*args, "--set", "train.max_steps=3", "--set", "train.save_every=1", "--set", "data.batch_size=2"]) == 0
    assert json.loads((model_dir / "training_report.json").read_text())["steps"] == 3
    # export the mean of the two newest checkpoints
    assert main([*args, "--stage", "export", "--average", "2", "--export", str(tmp_path / "avg")]) == 0
    assert json.loads((tmp_path / "avg" / "training_report.json").read_text())["averaged_checkpoints"] == [3, 2]
