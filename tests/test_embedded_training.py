"""The embedded model's recipe: its tokenizer, the in-process ShapeStories source, the VAE stage, the line chart and
the ``train-embedded`` command running a recipe of stages end to end (a few steps each)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file

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
    csv.write_text("step,time,tag,value\n1,0.5,loss,3.0\n1,0.5,lr,0.1\n2,1.0,loss,2.5\n", encoding="utf-8")
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


def write_recipe(path: Path, stages: list[dict], **top) -> Path:
    path.write_text(
        yaml.safe_dump({"vae_steps": 3, "vae_batch_size": 4, "seed": 0, **top, "stages": stages}), encoding="utf-8"
    )
    return path


SMALL_STAGES = [
    {  # a cut schedule, as the shipped main stage
        "name": "first",
        "config": "configs/train/embedded_shapestories.yaml",
        "set": ["train.max_steps=4", "train.stop_at=2", "train.save_every=1"],
    },
    {  # an export that adds a zero-initialised weight and averages two checkpoints
        "name": "gated",
        "config": "configs/train/embedded_shapestories_questions.yaml",
        "set": ["train.max_steps=2", "train.save_every=1"],
        "export_average": 2,
        "export_set": ["image_context_embeddings=true"],
    },
    {  # a training-only head, dropped at export
        "name": "probed",
        "config": "configs/train/embedded_shapestories_probe.yaml",
        "set": ["train.max_steps=2", "train.save_every=1"],
        "export_drop": ["attribute_probe."],
    },
]


def test_train_embedded_runs_the_recipe_stage_by_stage_and_resumes(tmp_path: Path, capsys, monkeypatch) -> None:
    import comfy_mm_interleaved.train.loop as loop
    from comfy_mm_interleaved.checkpoint import from_pretrained

    out, recipe = tmp_path / "emb", write_recipe(tmp_path / "recipe.yaml", SMALL_STAGES)
    args = [
        "train-embedded",
        "--out",
        str(out),
        "--recipe",
        str(recipe),
        "--threads",
        "1",
        "--set",
        "data.batch_size=2",
    ]
    stages = out / "stages"
    assert main([*args, "--until", "gated"]) == 0
    assert sorted(p.name for p in stages.iterdir()) == ["01_first", "02_gated"] and not (out / "model").exists()
    first = json.loads((stages / "01_first" / "model" / "stage.json").read_text(encoding="utf-8"))
    assert first["steps"] == 2 and first["averaged_checkpoints"] == [2] and first["from"] == str(out / "init")
    gated = json.loads((stages / "02_gated" / "model" / "stage.json").read_text(encoding="utf-8"))
    assert gated["averaged_checkpoints"] == [2, 1] and gated["from"] == str(stages / "01_first" / "model")
    gated_model = from_pretrained(stages / "02_gated" / "model")
    assert gated_model.config.image_context_embeddings and not gated_model.context_embed_gate.any()
    finished = {name: (stages / name / "model" / "stage.json").stat().st_mtime_ns for name in ("01_first", "02_gated")}
    capsys.readouterr()
    assert main([*args, "--stage", "status"]) == 0
    status = capsys.readouterr().out.splitlines()
    assert status[0] == "vae: done" and status[1].startswith("first: done, 2 steps, ")
    assert status[3] == "probed: not started (2 steps)"

    # a stage stopped by a signal keeps its checkpoint and stops the command; the next call resumes it
    real_train = loop.train

    def stopped_train(cfg):  # noqa: ANN001, ANN202
        return dataclasses.replace(real_train(cfg), stopped_by_signal=True)

    monkeypatch.setattr(loop, "train", stopped_train)
    assert main(args) == 0
    assert "[probed] stopped at step 2 with a checkpoint; run the command again" in capsys.readouterr().out
    assert (stages / "03_probed" / "run" / "checkpoints" / "step_00000002").is_dir()
    assert not (stages / "03_probed" / "model").exists() and not (out / "model").exists()
    assert main([*args, "--stage", "status"]) == 0
    assert "probed: at step 2 of 2, " in capsys.readouterr().out
    monkeypatch.setattr(loop, "train", real_train)
    assert main(args) == 0
    assert "[first]" in (log := capsys.readouterr().out) and "exists; skipping the stage" in log
    assert {n: (stages / n / "model" / "stage.json").stat().st_mtime_ns for n in finished} == finished

    model_dir = out / "model"
    report = json.loads((model_dir / "training_report.json").read_text(encoding="utf-8"))
    assert [s["name"] for s in report["stages"]] == ["first", "gated", "probed"]
    assert [s["steps"] for s in report["stages"]] == [2, 2, 2] and report["steps"] == 6
    assert set(report["wall_seconds"]) == {"vae", "first", "gated", "probed"}
    assert report["vae"]["steps"] == 3 and report["recipe"]["stages"][2]["export_drop"] == ["attribute_probe."]
    assert report["command"].startswith("python -m comfy_mm_interleaved train-embedded")
    assert len(report["invocations"]) == 3
    for name in ("loss_text.png", "loss_image.png", "loss_total.png"):
        assert Image.open(model_dir / name).size == (640, 360)
    assert not (model_dir / "stage.json").exists()
    weights = load_file(str(model_dir / "connector-00001.safetensors"))
    assert "context_embed_gate" in weights and not any(k.startswith("attribute_probe.") for k in weights)
    vae_scale = json.loads((out / "init" / "vae_training.json").read_text(encoding="utf-8"))["scaling_factor"]
    engine = InterleavedEngine.from_pretrained(model_dir, device="cpu")
    assert engine.model.image_decoder.decoder.scaling_factor == pytest.approx(vae_scale)
    assert engine.model.config.image_context_embeddings
    reply = engine.generate_text(
        Interleaved([render(Attributes("circle", "red", "small", "top", "left", 0.12, (0.0, 0.0)), 64)]),
        TextOptions(max_new_tokens=3),
    )
    assert isinstance(reply.text, str)
    # the export alone rebuilds the folder from the finished stages
    assert main([*args, "--stage", "export", "--export", str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / "training_report.json").read_text(encoding="utf-8"))["steps"] == 6


def test_recipe_errors_are_clear(tmp_path: Path, capsys) -> None:
    def refused(stages: list[dict], **top) -> str:
        recipe = write_recipe(tmp_path / "r.yaml", stages, **top)
        assert main(["train-embedded", "--out", str(tmp_path / "o"), "--recipe", str(recipe)]) == 1
        return capsys.readouterr().err

    stage = SMALL_STAGES[0]
    assert "has no stages" in refused([])
    assert "two stages are named 'first'" in refused([stage, stage])
    assert "must be lower-case letters" in refused([{**stage, "name": "Main stage"}])
    assert "not one of all, vae, export" in refused([{**stage, "name": "vae"}])
    assert "which does not exist" in refused([{**stage, "config": "configs/train/nothing.yaml"}])
    assert "export_average 0; use >= 1" in refused([{**stage, "export_average": 0}])
    assert "unknown keys ['steps']" in refused([{**stage, "steps": 3}])
    assert "must look like key=value" in refused([{**stage, "set": ["train.max_steps"]}])
    recipe = write_recipe(tmp_path / "r.yaml", [stage])
    assert main(["train-embedded", "--out", str(tmp_path / "o"), "--recipe", str(recipe), "--until", "second"]) == 1
    assert "--until 'second' is not a stage" in capsys.readouterr().err
    assert main(["train-embedded", "--out", str(tmp_path / "o"), "--recipe", str(recipe), "--vae-steps", "0"]) == 1
    assert "--vae-steps 0: the VAE stage needs at least 1 step" in capsys.readouterr().err
    assert main(["train-embedded", "--out", str(tmp_path / "o"), "--recipe", str(tmp_path / "none.yaml")]) == 1
    assert "none.yaml does not exist" in capsys.readouterr().err


def test_the_shipped_recipe_is_the_shipped_model_s_history() -> None:
    """Every stage of configs/recipes/embedded.yaml loads as a training config, can export what it saves, and
    the stages are the shipped model's: the main run, then its continuations, with their steps."""
    from comfy_mm_interleaved.shapestories.recipe import DEFAULT_RECIPE, Recipe
    from comfy_mm_interleaved.train.config import TrainConfig

    recipe = Recipe.load(DEFAULT_RECIPE)
    shipped = json.loads(
        (Path(__file__).resolve().parents[1] / "comfy_mm_interleaved/embedded/training_report.json").read_text(
            encoding="utf-8"
        )
    )
    history = [shipped["steps"], *(c["steps"] for c in shipped["continuations"])]
    steps, configs = [], [shipped["train_config"], *(c["config"] for c in shipped["continuations"])]
    for stage in recipe.stages:
        cfg = TrainConfig.load(stage.config_path(), stage.set)
        last = cfg.train.stop_at or cfg.train.max_steps
        steps.append(last)
        assert stage.export_average <= cfg.train.keep_last, stage.name
        saved = {last, *range(cfg.train.save_every, last, cfg.train.save_every)}
        assert len(saved) >= stage.export_average, stage.name
        probed = (cfg.model.factory or "").endswith("probe:build_probed_model")  # its training-only head is dropped
        assert stage.export_drop == (["attribute_probe."] if probed else []), stage.name
    assert steps == history
    assert [stage.config for stage in recipe.stages] == configs
    assert recipe.vae_steps == shipped["vae"]["steps"]


def test_the_shipped_recipe_rehearsed_end_to_end_builds_the_shipped_architecture(tmp_path: Path) -> None:
    """``train-embedded --rehearse`` runs every stage of the shipped recipe for a few steps: each stage starts from the
    last one's export, and the result has the shipped model's config (but its own VAE scale) and exactly its weights."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "emb"
    small = ["--set", "data.batch_size=2", "--set", "train.num_workers=0"]
    assert main(["train-embedded", "--out", str(out), "--rehearse", "--threads", "1", *small]) == 0
    report = json.loads((out / "model" / "training_report.json").read_text(encoding="utf-8"))
    names = [stage["name"] for stage in report["stages"]]
    assert names == [stage["name"] for stage in report["recipe"]["stages"]] and len(names) == 12
    assert report["vae"]["steps"] == 3
    folders = [out / "stages" / f"{number:02d}_{name}" / "model" for number, name in enumerate(names, 1)]
    assert [stage["from"] for stage in report["stages"]] == [str(out / "init"), *map(str, folders[:-1])]
    ours = json.loads((out / "model" / "config.json").read_text(encoding="utf-8"))
    shipped = json.loads((root / "comfy_mm_interleaved" / "embedded" / "config.json").read_text(encoding="utf-8"))
    ours["image_decoder"]["vae"]["scaling_factor"] = shipped["image_decoder"]["vae"]["scaling_factor"]
    assert ours == shipped

    def weight_names(folder: Path) -> set[str]:
        return set(json.loads((folder / "weights_index.json").read_text(encoding="utf-8"))["weight_map"])

    assert weight_names(out / "model") == weight_names(root / "comfy_mm_interleaved" / "embedded")
