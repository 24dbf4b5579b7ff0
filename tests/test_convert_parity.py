"""The converter on the golden official-format release, and loading the result into ``MMInterleaved``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from comfy_mm_interleaved.checkpoint import (
    COMPONENTS,
    CheckpointError,
    check_tensor_specs,
    component_of,
    expected_tensor_specs,
    from_pretrained,
    load_state_dict_from_folder,
    read_config,
    read_index,
)
from comfy_mm_interleaved.config import MMInterleavedConfig
from comfy_mm_interleaved.convert import OFFICIAL_INDEX, convert_official, load_config_file
from conftest import assert_close, golden_dir, load_case
from helpers_checkpoint import OFFICIAL_TINY, converted_tiny_checkpoint  # noqa: F401
from helpers_model import fixture_draws, fixture_images, forward_kwargs
from test_qformer import REFERENCE_KEYS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(str(golden_dir() / "tiny_official_state_dict.safetensors"))


@pytest.fixture(scope="module")
def tiny_config() -> MMInterleavedConfig:
    return MMInterleavedConfig.from_official_tiny(golden_dir() / "tiny_config.json")


def test_convert_parity_bit_exact(converted_tiny_checkpoint, reference, tiny_config):  # noqa: F811
    converted = load_state_dict_from_folder(converted_tiny_checkpoint)
    assert set(converted) == set(reference)
    for key, tensor in reference.items():
        assert converted[key].dtype == tensor.dtype, key
        assert torch.equal(converted[key], tensor), key
    config, fmt = read_config(converted_tiny_checkpoint)
    assert config.to_dict() == tiny_config.to_dict() and fmt["dtype"] == "float32"
    index = read_index(converted_tiny_checkpoint)
    assert set(index["components"]) == set(COMPONENTS)
    for name, entry in index["files"].items():
        assert name.startswith(entry["component"] + "-") and name.endswith(".safetensors")
    assert all(name.startswith(component_of(key) + "-") for key, name in index["weight_map"].items())


def test_from_pretrained_parity(converted_tiny_checkpoint, reference):  # noqa: F811
    model = from_pretrained(converted_tiny_checkpoint)
    assert not model.training
    state = model.state_dict()
    assert set(state) == set(reference)
    for key, tensor in reference.items():
        assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), key
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_converted_checkpoint_forward_parity(converted_tiny_checkpoint):  # noqa: F811
    """End to end: the official release -> converter -> from_pretrained -> training forward = the official one."""
    case = load_case("forward")
    model = from_pretrained(converted_tiny_checkpoint)
    with torch.no_grad():
        output = model(
            **forward_kwargs(case),
            image_tensors=fixture_images(case, "image_tensors"),
            image_tensors_dec=fixture_images(case, "image_tensors_dec"),
            draws=fixture_draws(case),
        )
    assert_close(output.text_logits, case["out.text_logits"], 1e-4, "out.text_logits")
    for name in ("loss", "loss_txt", "loss_img"):
        expected = case.meta["scalars"][name]
        assert abs(float(getattr(output, name)) - expected) <= 1e-4 * max(1.0, abs(expected)), name


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_from_pretrained_dtype_parity(converted_tiny_checkpoint, reference, dtype):  # noqa: F811
    model = from_pretrained(converted_tiny_checkpoint, dtype=dtype)
    state = model.state_dict()
    for key, tensor in reference.items():
        expected = tensor.to(DTYPES[dtype]) if tensor.is_floating_point() else tensor
        assert state[key].dtype == expected.dtype and torch.equal(state[key], expected), key


def test_from_pretrained_components(converted_tiny_checkpoint, reference):  # noqa: F811
    text_only = ("llm", "text_decoder", "connector")
    model = from_pretrained(converted_tiny_checkpoint, components=text_only)
    assert model.visual_tokenizer is None and model.image_decoder is None
    state = model.state_dict()
    assert set(state) == {k for k in reference if component_of(k) in text_only}
    assert all(torch.equal(state[k], reference[k]) for k in state)
    assert not any(t.is_meta for t in state.values())

    unet_only = from_pretrained(converted_tiny_checkpoint, components=["unet"])
    unet_keys = {k for k, t in unet_only.state_dict().items() if not t.is_meta}
    assert {k for k in unet_keys if component_of(k) == "unet"} == {k for k in reference if component_of(k) == "unet"}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_convert_low_precision(tmp_path, reference, dtype):
    folder = convert_official(
        golden_dir() / OFFICIAL_TINY, tmp_path / "model", dtype=dtype, config=golden_dir() / "tiny_config.json"
    )
    stored = load_state_dict_from_folder(folder)
    assert read_index(folder)["dtype"] == dtype
    for key, tensor in reference.items():
        fixed_table = key.rsplit(".", 1)[-1] in ("pos_embed", "clip_mean", "clip_std")
        expected = tensor if fixed_table or not tensor.is_floating_point() else tensor.to(DTYPES[dtype])
        assert stored[key].dtype == expected.dtype and torch.equal(stored[key], expected), key


def test_config_file_formats(converted_tiny_checkpoint, tiny_config):  # noqa: F811
    assert load_config_file(golden_dir() / "tiny_config.json").to_dict() == tiny_config.to_dict()
    ours = converted_tiny_checkpoint / "config.json"
    assert load_config_file(ours).to_dict() == tiny_config.to_dict()
    assert load_config_file(converted_tiny_checkpoint).to_dict() == tiny_config.to_dict()


def test_convert_rejects_the_wrong_config(tmp_path, reference):
    """The 13B default config on the tiny release: the index check fails before anything is written."""
    with pytest.raises(CheckpointError) as info:
        convert_official(golden_dir() / OFFICIAL_TINY, tmp_path / "model", dtype="float32")
    message = str(info.value)
    layers = len({k.split(".")[2] for k in reference if k.startswith("mm_decoder.layers.")})
    assert f"index {golden_dir() / OFFICIAL_TINY / OFFICIAL_INDEX}: the tensors do not match" in message
    assert "missing tensor(s)" in message and "--config" in message
    big_layers = MMInterleavedConfig.official_13b().llm.num_hidden_layers
    assert f"llm.num_hidden_layers: checkpoint {layers}, config {big_layers}" in message
    assert list(tmp_path.iterdir()) == []


def _copy_release(tmp_path):
    src = tmp_path / "release"
    shutil.copytree(golden_dir() / OFFICIAL_TINY, src)
    for path in src.iterdir():
        path.chmod(0o644)
    return src


def test_convert_rejects_misshaped_tensors(tmp_path, reference, tiny_config):
    """Same keys, other sizes: caught in the shape pass, before any file is written."""
    src = _copy_release(tmp_path)
    index = json.loads((src / OFFICIAL_INDEX).read_text(encoding="utf-8"))
    key = "mm_decoder.norm.weight"
    shard = src / index["weight_map"][key]
    state = torch.load(shard, weights_only=True)
    state[key] = torch.ones(reference[key].shape[0] + 2)
    torch.save(state, shard)
    with pytest.raises(CheckpointError) as info:
        convert_official(src, tmp_path / "model", config=tiny_config)
    hidden = reference[key].shape[0]
    assert f"{key} [{hidden + 2}] (expected [{hidden}])" in str(info.value)
    assert f"llm.hidden_size: checkpoint {hidden + 2}, config {hidden}" in str(info.value)
    assert not (tmp_path / "model").exists()


def test_convert_rejects_tensors_of_the_wrong_kind(tmp_path, reference, tiny_config):
    """An integer tensor where the model has a floating one: refused before any file is written (a cast would
    not make it right); another float precision is fine (cast on conversion)."""
    src = _copy_release(tmp_path)
    index = json.loads((src / OFFICIAL_INDEX).read_text(encoding="utf-8"))
    key = "mm_decoder.norm.weight"
    shard = src / index["weight_map"][key]
    state = torch.load(shard, weights_only=True)
    state[key] = torch.ones(reference[key].shape, dtype=torch.int32)
    torch.save(state, shard)
    with pytest.raises(CheckpointError, match=rf"wrong kind \(integer vs floating point\): {key} int32"):
        convert_official(src, tmp_path / "model", config=tiny_config)
    assert not (tmp_path / "model").exists()
    state[key] = reference[key].to(torch.float16)
    torch.save(state, shard)
    model = convert_official(src, tmp_path / "model", config=tiny_config, dtype="float32")
    assert torch.equal(from_pretrained(model).state_dict()[key], reference[key].to(torch.float16).float())


def test_convert_rejects_broken_releases(tmp_path, tiny_config):
    with pytest.raises(CheckpointError, match="does not exist"):
        convert_official(tmp_path / "nowhere", tmp_path / "model", config=tiny_config)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=f"neither {OFFICIAL_INDEX}"):
        convert_official(empty, tmp_path / "model", config=tiny_config)

    src = _copy_release(tmp_path)
    shards = sorted(p for p in src.iterdir() if p.suffix == ".bin")
    shards[-1].write_bytes(shards[-1].read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"{shards[-1].name} is not a readable PyTorch weights file"):
        convert_official(src, tmp_path / "model", config=tiny_config)
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"lists shard\\(s\\) missing.*{shards[-1].name}"):
        convert_official(src, tmp_path / "model", config=tiny_config)
    index = json.loads((src / OFFICIAL_INDEX).read_text(encoding="utf-8"))
    for weight_map in (list(index["weight_map"]), {**index["weight_map"], "soi_token": 3}):
        (src / OFFICIAL_INDEX).write_text(json.dumps({**index, "weight_map": weight_map}), encoding="utf-8")
        with pytest.raises(CheckpointError, match="'weight_map' must map each tensor name to a shard file name"):
            convert_official(src, tmp_path / "model", config=tiny_config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "release"]


def test_convert_refuses_code_in_pickles(tmp_path, tiny_config):
    """weights_only=True: a pickle that would run code is refused, not executed."""
    src = _copy_release(tmp_path)
    index = json.loads((src / OFFICIAL_INDEX).read_text(encoding="utf-8"))
    shard = src / sorted(set(index["weight_map"].values()))[0]
    torch.save({"payload": shutil.rmtree}, shard)  # unpickling would import an arbitrary callable
    with pytest.raises(CheckpointError, match="not a readable PyTorch weights file"):
        convert_official(src, tmp_path / "model", config=tiny_config)


def test_release_layout_fits_the_default_config():
    """The converter's expectation for the default config (an empty build) accepts the real 13B release layout."""
    release = {k: tuple(shape) for k, (shape, _) in json.loads(REFERENCE_KEYS.read_text(encoding="utf-8")).items()}
    expected = expected_tensor_specs(MMInterleavedConfig.official_13b())
    check_tensor_specs(release, expected, "the 13B release", "none needed")
    position_ids = "visual_tokenizer.encoder.vision_model.embeddings.position_ids"
    assert expected[position_ids][1] == torch.int64
    assert {component_of(k) for k in release} == set(COMPONENTS)
