"""Our model-folder format: round trips, sharding, routing, and clear errors for broken folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comfy_mm_interleaved import checkpoint as checkpoint_module
from comfy_mm_interleaved.checkpoint import (
    COMPONENTS,
    CONFIG_FILE,
    INDEX_FILE,
    CheckpointError,
    CheckpointWriter,
    check_tensor_specs,
    component_of,
    from_pretrained,
    load_state_dict_from_folder,
    read_config,
    read_index,
    save_pretrained,
)
from comfy_mm_interleaved.config import MMInterleavedConfig
from conftest import golden_dir

FIXED_TABLES = ("pos_embed", "clip_mean", "clip_std")  # stored float32 whatever the storage dtype
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(str(golden_dir() / "tiny_official_state_dict.safetensors"))


@pytest.fixture(scope="module")
def tiny_config() -> MMInterleavedConfig:
    return MMInterleavedConfig.from_official_tiny(golden_dir() / "tiny_config.json")


@pytest.fixture()
def saved(tmp_path: Path, reference, tiny_config) -> Path:
    return save_pretrained(reference, tmp_path / "model", config=tiny_config)


def _expected_on_disk(key: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if not tensor.is_floating_point() or key.rsplit(".", 1)[-1] in FIXED_TABLES:
        return tensor
    return tensor.to(dtype)


def test_component_routing():
    cases = {
        "soi_token": "connector",
        "context_feat_proj.weight": "connector",
        "mm_decoder.layers.0.llama_cross_attn.gate": "llm",
        "mm_decoder.embed_tokens.weight": "llm",
        "text_decoder.head_new.bias": "text_decoder",
        "visual_tokenizer.encoder.vision_model.embeddings.position_ids": "visual_tokenizer",
        "image_decoder.neg_prompt_embeds": "image_decoder",
        "image_decoder.perceiver_resampler.queries": "image_decoder",
        "image_decoder.decoder.unet.conv_in.weight": "unet",
        "image_decoder.decoder.mmfs_module.mmfs_mid_block.conv.weight": "unet_mmfs",
        "image_decoder.decoder.vae.decoder.conv_out.bias": "vae",
    }
    assert {key: component_of(key) for key in cases} == cases
    with pytest.raises(CheckpointError, match="belongs to no MM-Interleaved component"):
        component_of("lm_head.weight")
    with pytest.raises(CheckpointError):
        component_of("soi_token_extra")


def test_every_reference_tensor_has_a_component(reference):
    assert {component_of(k) for k in reference} == set(COMPONENTS)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_round_trip(tmp_path, reference, tiny_config, dtype):
    folder = save_pretrained(reference, tmp_path / "model", config=tiny_config, dtype=dtype)
    config, fmt = read_config(folder)
    assert config.to_dict() == tiny_config.to_dict()
    assert fmt["dtype"] == dtype and read_index(folder)["dtype"] == dtype

    stored = load_state_dict_from_folder(folder)
    assert set(stored) == set(reference)
    for key, tensor in reference.items():
        expected = _expected_on_disk(key, tensor, DTYPES[dtype])
        assert stored[key].dtype == expected.dtype, key
        assert torch.equal(stored[key], expected), key

    as_fp32 = load_state_dict_from_folder(folder, dtype="float32")
    for key, tensor in reference.items():
        expected = _expected_on_disk(key, tensor, DTYPES[dtype])
        expected = expected.float() if expected.is_floating_point() else expected
        assert as_fp32[key].dtype == expected.dtype and torch.equal(as_fp32[key], expected), key


def test_sharding_and_component_subsets(tmp_path, reference, tiny_config):
    total = sum(t.numel() * t.element_size() for t in reference.values())
    max_bytes = total // 25
    folder = save_pretrained(reference, tmp_path / "model", config=tiny_config, max_shard_bytes=max_bytes)
    index = read_index(folder)
    assert index["metadata"]["total_size"] == total
    assert index["metadata"]["num_tensors"] == len(reference)
    assert set(index["weight_map"]) == set(reference)
    assert sum(len(c["files"]) for c in index["components"].values()) > len(COMPONENTS)
    for component, entry in index["components"].items():
        files = set(entry["files"])
        keys = [k for k, f in index["weight_map"].items() if f in files]
        assert keys and all(component_of(k) == component for k in keys)
        assert entry["num_tensors"] == len(keys)
        assert entry["num_elements"] == sum(reference[k].numel() for k in keys)
    for name in index["files"]:
        part = load_file(str(folder / name))
        nbytes = sum(t.numel() * t.element_size() for t in part.values())
        assert nbytes <= max_bytes or len(part) == 1, name
        assert os.path.getsize(folder / name) == index["files"][name]["size_bytes"]

    subset = load_state_dict_from_folder(folder, components=["llm", "vae"], device={"llm": "cpu"})
    assert set(subset) == {k for k in reference if component_of(k) in ("llm", "vae")}
    assert all(torch.equal(subset[k], reference[k]) for k in subset)
    with pytest.raises(CheckpointError, match="unknown component"):
        load_state_dict_from_folder(folder, components=["lm"])


def test_missing_config_json(saved):
    (saved / CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"no {CONFIG_FILE}.*re-convert"):
        read_config(saved)
    with pytest.raises(CheckpointError, match=CONFIG_FILE):
        from_pretrained(saved)


def test_missing_folder_and_index(tmp_path, saved):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_config(tmp_path / "nowhere")
    (saved / INDEX_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"no {INDEX_FILE}.*interrupted"):
        load_state_dict_from_folder(saved)


def test_index_points_to_missing_file(saved):
    victim = sorted(read_index(saved)["files"])[0]
    (saved / victim).unlink()
    with pytest.raises(CheckpointError, match=f"lists {victim}.*missing.*re-convert"):
        load_state_dict_from_folder(saved)


def test_truncated_file(saved):
    victim = sorted(read_index(saved)["files"])[-1]
    data = (saved / victim).read_bytes()
    (saved / victim).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{victim} is truncated or corrupt.*re-convert"):
        load_state_dict_from_folder(saved)


def test_garbled_header(saved):
    victim = sorted(read_index(saved)["files"])[0]
    data = bytearray((saved / victim).read_bytes())
    data[8:40] = b"#" * 32  # the JSON header starts after its 8-byte length
    (saved / victim).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{victim} is not a readable safetensors file.*re-convert"):
        load_state_dict_from_folder(saved)


def test_file_not_matching_the_index(saved):
    index = read_index(saved)
    first, second = sorted(index["files"])[:2]
    moved = next(k for k, f in index["weight_map"].items() if f == first)
    index["weight_map"][moved] = second
    (saved / INDEX_FILE).write_text(json.dumps(index), encoding="utf-8")
    with pytest.raises(CheckpointError, match=f"does not hold the tensors the index lists.*{moved}"):
        load_state_dict_from_folder(saved)


def test_damaged_index_tables(saved):
    index = read_index(saved)
    for key, damaged in (("files", None), ("components", []), ("weight_map", ["a", "b"])):
        (saved / INDEX_FILE).write_text(json.dumps({**index, key: damaged}), encoding="utf-8")
        with pytest.raises(CheckpointError, match=f"has no valid '{key}' table.*re-convert"):
            load_state_dict_from_folder(saved)
    (saved / INDEX_FILE).write_text(json.dumps(["not", "an", "index"]), encoding="utf-8")
    with pytest.raises(CheckpointError, match="is not a comfy_mm_interleaved index"):
        read_index(saved)


def test_failed_save_leaves_nothing(tmp_path, reference, tiny_config):
    broken = dict(reference)
    last_vae_key = [k for k in reference if component_of(k) == COMPONENTS[-1]][-1]
    broken[last_vae_key] = torch.empty(broken[last_vae_key].shape, device="meta")
    with pytest.raises(CheckpointError, match=f"{last_vae_key}.*meta device"):
        save_pretrained(broken, tmp_path / "model", config=tiny_config, max_shard_bytes=10_000)
    assert list(tmp_path.iterdir()) == []


def test_existing_destination(tmp_path, reference, tiny_config, saved):
    with pytest.raises(CheckpointError, match="already exists"):
        save_pretrained(reference, saved, config=tiny_config)
    # what the user added (tokenizer/, notes) stays; the weights, config and index are replaced
    (saved / "tokenizer").mkdir()
    (saved / "tokenizer" / "tokenizer.json").write_text("{}", encoding="utf-8")
    (saved / "notes.txt").write_text("mine", encoding="utf-8")
    old_files = set(read_index(saved)["files"])
    save_pretrained(reference, saved, config=tiny_config, dtype="float16", overwrite=True, max_shard_bytes=2**16)
    index = read_index(saved)
    assert index["dtype"] == "float16" and set(index["files"]) != old_files  # smaller shards: other file names
    names = {p.name for p in saved.iterdir()}
    assert names == {"config.json", "weights_index.json", "tokenizer", "notes.txt", *index["files"]}
    assert (saved / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8") == "{}" and (
        saved / "notes.txt"
    ).read_text(encoding="utf-8") == "mine"
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]

    for name, files in (("not_a_model", {"notes.txt": "keep me"}), ("hf_model", {"config.json": "{}", "x.bin": "w"})):
        other = tmp_path / name  # a plain folder, or another library's model folder (it has a config.json too)
        other.mkdir()
        for file, text in files.items():
            (other / file).write_text(text, encoding="utf-8")
        with pytest.raises(CheckpointError, match="not a model folder written by comfy_mm_interleaved"):
            save_pretrained(reference, other, config=tiny_config, overwrite=True)
        assert {p.name: p.read_text(encoding="utf-8") for p in other.iterdir()} == files

    empty = tmp_path / "empty"
    empty.mkdir()
    save_pretrained(reference, empty, config=tiny_config)
    assert read_index(empty)["metadata"]["num_tensors"] == len(reference)


def test_overwrite_that_fails_at_the_swap_keeps_the_old_folder_and_the_users_files(
    tmp_path, reference, tiny_config, saved, monkeypatch
):
    (saved / "tokenizer").mkdir()
    (saved / "tokenizer" / "tokenizer.json").write_text("{}", encoding="utf-8")
    before = {p.name: p.stat().st_size for p in saved.iterdir() if p.is_file()}
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst).name == "model" and ".old-" in Path(dst).parent.name:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        save_pretrained(reference, saved, config=tiny_config, dtype="float16", overwrite=True)
    monkeypatch.undo()
    assert {p.name: p.stat().st_size for p in saved.iterdir() if p.is_file()} == before
    assert (saved / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8") == "{}"
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]  # no partial or old folder left
    assert read_index(saved)["dtype"] == "float32"


def test_a_save_that_loses_the_race_for_a_new_folder_is_refused(tmp_path, reference, tiny_config):
    first = CheckpointWriter(tmp_path / "model")
    with CheckpointWriter(tmp_path / "model") as second:  # both started while the folder did not exist
        second.add(reference)
        second.commit(tiny_config)
    with first, pytest.raises(CheckpointError, match="was written by another save while this one ran"):
        first.add(reference)
        first.commit(tiny_config)
    assert read_index(tmp_path / "model")["metadata"]["num_tensors"] == len(reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_overwrite_through_a_symlink_replaces_what_it_points_to(tmp_path, reference, tiny_config):
    store = tmp_path / "other_drive" / "model"
    save_pretrained(reference, store, config=tiny_config)
    (store / "tokenizer").mkdir()
    link = tmp_path / "models" / "mm"
    link.parent.mkdir()
    link.symlink_to(store, target_is_directory=True)
    save_pretrained(reference, link, config=tiny_config, dtype="bfloat16", overwrite=True)
    assert link.is_symlink() and link.resolve() == store.resolve()
    assert read_index(store)["dtype"] == "bfloat16" and (store / "tokenizer").is_dir()
    assert sorted(p.name for p in store.parent.iterdir()) == ["model"]


def test_weights_files_are_readable_by_everyone(saved):
    for name in read_index(saved)["files"]:
        assert (saved / name).stat().st_mode & 0o777 == 0o644, name


def test_save_needs_a_config(tmp_path, reference):
    with pytest.raises(CheckpointError, match="needs the MMInterleavedConfig"):
        save_pretrained(reference, tmp_path / "model")


def test_check_tensor_specs_lists_every_problem(reference):
    expected = {k: (tuple(t.shape), t.dtype) for k, t in reference.items()}
    actual: dict[str, tuple[int, ...] | None] = {k: tuple(t.shape) for k, t in reference.items()}
    missing = sorted(actual)[0]
    del actual[missing]
    actual["mm_decoder.lm_head.weight"] = (3, 3)
    norm = "mm_decoder.norm.weight"
    hidden = expected[norm][0][0]
    actual[norm] = (hidden + 1,)
    with pytest.raises(CheckpointError) as info:
        check_tensor_specs(actual, expected, "folder X", "do Y")
    message = str(info.value)
    assert "folder X: the tensors do not match" in message
    assert f"1 missing tensor(s): {missing}" in message
    assert "1 unexpected tensor(s): mm_decoder.lm_head.weight" in message
    assert f"{norm} [{hidden + 1}] (expected [{hidden}])" in message
    assert f"llm.hidden_size: checkpoint {hidden + 1}, config {hidden}" in message
    assert "fix: do Y" in message

    # Keys only (an index): a different number of LLM layers is named as such.
    layers = {int(k.split(".")[2]) for k in reference if k.startswith("mm_decoder.layers.")}
    fewer = {k: None for k in reference if not k.startswith(f"mm_decoder.layers.{max(layers)}.")}
    with pytest.raises(CheckpointError, match=f"llm.num_hidden_layers: checkpoint {len(layers) - 1}, config"):
        check_tensor_specs(fewer, expected, "index", "fix")
    check_tensor_specs({k: tuple(t.shape) for k, t in reference.items()}, expected, "ok", "nothing")


def test_long_lists_are_truncated(reference):
    expected = {k: (tuple(t.shape), t.dtype) for k, t in reference.items()}
    with pytest.raises(CheckpointError) as info:
        check_tensor_specs({}, expected, "empty", "fix")
    assert f"{len(reference)} missing tensor(s)" in str(info.value)
    assert f"(+{len(reference) - 12} more)" in str(info.value)


def test_from_pretrained_lists_what_does_not_fit(tmp_path, reference, tiny_config):
    broken = dict(reference)
    misshaped = "context_feat_proj.bias"
    missing = next(k for k in sorted(broken) if k != misshaped)
    del broken[missing]
    broken["mm_decoder.extra.weight"] = torch.zeros(2)
    size = reference[misshaped].shape[0]
    broken[misshaped] = torch.zeros(size + 1)
    folder = save_pretrained(broken, tmp_path / "model", config=tiny_config)
    with pytest.raises(CheckpointError) as info:
        from_pretrained(folder)
    message = str(info.value)
    assert f"model folder {folder}: the tensors do not match the model built from the config" in message
    assert f"1 missing tensor(s): {missing}" in message
    assert "1 unexpected tensor(s): mm_decoder.extra.weight" in message
    assert f"{misshaped} [{size + 1}] (expected [{size}])" in message
    assert "re-convert" in message


def test_save_pretrained_of_a_module(tmp_path, reference, tiny_config):
    model = from_pretrained(save_pretrained(reference, tmp_path / "a", config=tiny_config), dtype="bfloat16")
    folder = save_pretrained(model, tmp_path / "b", max_shard_bytes=50_000)  # the config comes from the model
    assert read_config(folder)[0].to_dict() == tiny_config.to_dict()
    assert read_index(folder)["dtype"] == "bfloat16"
    again = from_pretrained(folder, dtype="bfloat16").state_dict()
    for key, tensor in reference.items():
        expected = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
        assert again[key].dtype == expected.dtype and torch.equal(again[key], expected), key
