"""``export-checkpoint``: training checkpoints -> a model folder (config + weights + tokenizer), averaged, with
config overrides that keep the weights, and clear errors for what cannot be exported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from comfy_mm_interleaved.checkpoint import from_pretrained, read_config, save_pretrained
from comfy_mm_interleaved.cli import main
from comfy_mm_interleaved.models.mm_interleaved import MMInterleaved
from comfy_mm_interleaved.tokenizer import build_word_tokenizer
from comfy_mm_interleaved.train.checkpointing import MANIFEST, file_digest, list_checkpoints
from comfy_mm_interleaved.train.config import TrainConfig
from comfy_mm_interleaved.train.export import export_checkpoint
from comfy_mm_interleaved.train.loop import train
from test_train_helpers import WORDS, build, story_corpus, tiny_config


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A base model folder (with tokenizer) and three checkpoints of a short run that started from it."""
    root = tmp_path_factory.mktemp("export")
    base = save_pretrained(build(), root / "base")
    config, _ = read_config(base)
    build_word_tokenizer(WORDS, config.special_tokens, config.orig_vocab_size).save_pretrained(str(base / "tokenizer"))
    corpus = story_corpus(root / "corpus", n_docs=8)
    source = {"format": "interleaved", "shards": str(corpus), "image_root": str(corpus.parent)}
    schedule = {"max_steps": 3, "save_every": 1, "keep_last": 5, "log_every": 1, "eval_every": 0, "seed": 3}
    data = {
        "model": {"init_from": str(base), "tokenizer": str(base / "tokenizer")},
        "optim": {"lr": 1e-3, "warmup_steps": 0},
        "train": {"output_dir": str(root / "out"), "progress_bar": False, "cpu": True, **schedule},
        "data": {"seq_len": 48, "batch_size": 1, "sources": [source]},
    }
    (root / "c.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    train(TrainConfig.load(root / "c.yaml"))
    return base, [folder for _, folder in sorted(list_checkpoints(root / "out" / "checkpoints"))]  # by step


def test_export_averages_checkpoints_and_applies_overrides(run, tmp_path: Path) -> None:
    base, checkpoints = run
    assert len(checkpoints) == 3
    out = tmp_path / "model"
    chosen = checkpoints[1:]
    arguments = [*map(str, chosen), "--base", str(base), "--out", str(out), "--set", "image_context_layer=1"]
    status = main(["export-checkpoint", *arguments])
    assert status == 0
    model = from_pretrained(out)
    assert model.config.image_context_layer == 1
    assert read_config(base)[0].image_context_layer is None  # the base is untouched
    first, second = (load_file(str(c / "model.safetensors")) for c in chosen)
    for name, tensor in model.state_dict().items():
        expected = (first[name] + second[name]) / 2 if tensor.is_floating_point() else first[name]
        assert torch.allclose(tensor, expected.to(tensor.dtype), atol=1e-6), name
    moved = [n for n in first if first[n].is_floating_point() and not torch.equal(first[n], second[n])]
    assert moved  # the run really trained, so the mean differs from either checkpoint
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    report = json.loads((out / "export.json").read_text(encoding="utf-8"))
    assert [c["step"] for c in report["checkpoints"]] == [2, 3]
    assert report["overrides"] == ["image_context_layer=1"] and report["base"] == str(base)


def test_export_into_its_own_base_folder_keeps_the_tokenizer(run, tmp_path: Path) -> None:
    base, checkpoints = run
    own = tmp_path / "own"
    shutil.copytree(base, own)
    arguments = [str(checkpoints[-1]), "--base", str(own), "--out", str(own), "--overwrite"]
    assert main(["export-checkpoint", *arguments]) == 0
    assert (own / "tokenizer" / "tokenizer.json").read_bytes() == (base / "tokenizer" / "tokenizer.json").read_bytes()
    exported = from_pretrained(own).state_dict()
    last = load_file(str(checkpoints[-1] / "model.safetensors"))
    assert all(torch.equal(exported[name], last[name]) for name in last if name in exported)


def test_export_with_an_override_that_adds_weights_keeps_their_initialisation(run, tmp_path: Path) -> None:
    base, checkpoints = run
    out = tmp_path / "gated"
    arguments = [str(checkpoints[-1]), "--base", str(base), "--out", str(out), "--set", "image_context_embeddings=true"]
    assert main(["export-checkpoint", *arguments]) == 0
    model = from_pretrained(out)
    assert model.config.image_context_embeddings
    assert torch.equal(model.context_embed_gate, torch.zeros_like(model.context_embed_gate))  # the same function
    trained = load_file(str(checkpoints[-1] / "model.safetensors"))
    for name, tensor in model.state_dict().items():
        if name != "context_embed_gate":
            assert torch.equal(tensor, trained[name]), name
    assert json.loads((out / "export.json").read_text(encoding="utf-8"))["initialised"] == ["context_embed_gate"]
    # a weight of the base model itself is never made up: a checkpoint that lacks one is refused
    partial = tmp_path / "partial"
    shutil.copytree(checkpoints[-1], partial)
    weights = load_file(str(partial / "model.safetensors"))
    del weights["soi_token"]
    save_file(weights, str(partial / "model.safetensors"))
    manifest = json.loads((partial / MANIFEST).read_text(encoding="utf-8"))
    manifest["files"]["model.safetensors"] = {
        "size": (partial / "model.safetensors").stat().st_size,
        "sha256": file_digest(partial / "model.safetensors"),
    }
    (partial / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(ValueError, match=r"1 missing keys \(e.g. \['soi_token'\]\)"):
        export_checkpoint([partial], base, tmp_path / "x", ["image_context_embeddings=true"])


def test_export_errors_are_clear(run, tmp_path: Path, capsys) -> None:
    base, checkpoints = run

    def export(*arguments: str) -> str:
        assert main(["export-checkpoint", *arguments]) == 1
        return capsys.readouterr().err

    out = str(tmp_path / "model")
    assert "is not a folder" in export(str(tmp_path / "nothing"), "--base", str(base), "--out", out)
    broken = tmp_path / "broken"
    shutil.copytree(checkpoints[0], broken)
    (broken / "model.safetensors").write_bytes(b"not the weights")
    assert "is not a valid checkpoint" in export(str(broken), "--base", str(base), "--out", out)
    other = save_pretrained(MMInterleaved(tiny_config(llm_width=32)), tmp_path / "other")  # another architecture
    assert "do not match" in export(str(checkpoints[0]), "--base", str(other), "--out", out)
    assert "image_context_layer must be None" in export(
        str(checkpoints[0]), "--base", str(base), "--out", out, "--set", "image_context_layer=99"
    )
    assert main(["export-checkpoint", str(checkpoints[0]), "--base", str(base), "--out", out]) == 0
    assert "pass --overwrite" in export(str(checkpoints[0]), "--base", str(base), "--out", out)
    assert main(["export-checkpoint", str(checkpoints[0]), "--base", str(base), "--out", out, "--overwrite"]) == 0
