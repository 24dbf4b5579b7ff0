"""Convert the official MM-Interleaved release into our model folder format (see ``checkpoint.py``).

The release (``OpenGVLab/MM-Interleaved``, ``mm_interleaved_pretrain/``) is two float32 PyTorch pickles,
``pytorch_model-0000X-of-0000N.bin``, plus ``pytorch_model.bin.index.json`` (``weight_map``: key -> shard). The
converter checks the index's key set against the model built from the config, then the shapes of every shard (memory
mapped, so only headers are touched), and only then converts: one shard at a time, memory mapped, each shard's
tensors routed to their components and written as ``<component>-<k>.safetensors`` parts before the next shard is
opened. Peak memory is therefore about one output part, not the 60 GB model.

This module and ``eval/inception_convert.py`` (the FID Inception weights) are the only places in the library that
read pickles, always with ``weights_only=True``.
"""

from __future__ import annotations

import gc
import json
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import (
    CONFIG_FILE,
    DEFAULT_MAX_SHARD_BYTES,
    FORMAT_KEY,
    CheckpointError,
    CheckpointWriter,
    TensorSpec,
    check_tensor_specs,
    check_tensors,
    expected_tensor_specs,
    format_list,
)
from .config import MMInterleavedConfig

OFFICIAL_INDEX = "pytorch_model.bin.index.json"
OFFICIAL_SINGLE_FILE = "pytorch_model.bin"
_REDOWNLOAD = "re-download it (OpenGVLab/MM-Interleaved, mm_interleaved_pretrain/)"


def load_pickled_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``torch.save``d state dict, memory mapped, with ``weights_only=True`` (no code from the file runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} is missing; {_REDOWNLOAD}")
    try:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            # Files in the pre-1.6 (non-zip) format cannot be memory mapped: read them whole.
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable PyTorch weights file ({err}); {_REDOWNLOAD}") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path} does not hold a state dict (name -> tensor); is it a model weights file?")
    return state_dict


def read_official_index(src: str | Path) -> dict[str, str]:
    """``key -> shard file name`` of an official release folder (or one ``pytorch_model.bin`` without index)."""
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"official checkpoint folder {src} does not exist")
    index_path = src / OFFICIAL_INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index_path} is not a valid weights index ({err!r}); {_REDOWNLOAD}") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(
                f"{index_path}: 'weight_map' must map each tensor name to a shard file name; {_REDOWNLOAD}"
            )
        missing_files = sorted({f for f in weight_map.values() if not (src / f).is_file()})
        if missing_files:
            raise CheckpointError(f"{index_path} lists shard(s) missing from {src}: {format_list(missing_files)}")
        return dict(weight_map)
    if (src / OFFICIAL_SINGLE_FILE).is_file():
        return dict.fromkeys(load_pickled_state_dict(src / OFFICIAL_SINGLE_FILE), OFFICIAL_SINGLE_FILE)
    raise CheckpointError(
        f"{src} has neither {OFFICIAL_INDEX} nor {OFFICIAL_SINGLE_FILE}; point to the official "
        "mm_interleaved_pretrain/ folder (pytorch_model-0000X-of-0000N.bin + index)"
    )


def load_config_file(path: str | Path) -> MMInterleavedConfig:
    """Our ``config.json`` (or a model folder holding one), or the golden fixtures' ``tiny_config.json``."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"config file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"config file {path} is not valid JSON ({err})") from None
    if isinstance(data, dict) and "pretrained_folders" in data and "model" in data:
        return MMInterleavedConfig.from_official_tiny(path)
    if not isinstance(data, dict) or "llm" not in data:
        raise CheckpointError(
            f"{path} is neither an MM-Interleaved config.json nor a golden tiny_config.json; pass one of those"
        )
    data.pop(FORMAT_KEY, None)
    return MMInterleavedConfig.from_dict(data)


def _shard_specs(src: Path, shards: list[str], weight_map: dict[str, str]) -> dict[str, TensorSpec]:
    """Shape and dtype of every tensor of every shard (memory mapped: only the pickles' metadata is read)."""
    specs = {}
    for shard in shards:
        state_dict = load_pickled_state_dict(src / shard)
        listed = {k for k, f in weight_map.items() if f == shard}
        if set(state_dict) != listed:
            raise CheckpointError(
                f"{src / shard} does not hold the tensors {OFFICIAL_INDEX} assigns to it (missing: "
                f"{format_list(sorted(listed - set(state_dict)))}; extra: "
                f"{format_list(sorted(set(state_dict) - listed))}); {_REDOWNLOAD}"
            )
        specs.update({k: (tuple(v.shape), v.dtype) for k, v in state_dict.items()})
        del state_dict
    return specs


def convert_official(
    src: str | Path,
    dst: str | Path,
    dtype: str | torch.dtype = "bfloat16",
    config: MMInterleavedConfig | str | Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Convert the official release folder ``src`` into the model folder ``dst``; returns ``dst``.

    ``config``: an ``MMInterleavedConfig``, a path to our ``config.json`` or to a golden ``tiny_config.json``, or
    ``None`` for the released 13B model. Nothing appears at ``dst`` unless the whole conversion succeeds.
    """
    log = log or (lambda message: None)
    src = Path(src)
    if not isinstance(config, MMInterleavedConfig):
        config = MMInterleavedConfig.official_13b() if config is None else load_config_file(config)
    weight_map = read_official_index(src)
    shards = sorted(set(weight_map.values()))
    with CheckpointWriter(dst, dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite) as writer:
        expected: dict[str, TensorSpec] = expected_tensor_specs(config)
        fix = "pass --config with the config this checkpoint was trained with (our config.json or tiny_config.json)"
        check_tensor_specs(dict.fromkeys(weight_map), expected, f"the index {src / OFFICIAL_INDEX}", fix)
        check_tensors(_shard_specs(src, shards, weight_map), expected, f"the shards in {src}", fix)
        for number, shard in enumerate(shards, 1):
            log(f"[{number}/{len(shards)}] converting {shard}")
            state_dict = load_pickled_state_dict(src / shard)
            writer.add(state_dict)
            del state_dict
            gc.collect()
        folder = writer.commit(config)
    log(f"wrote {folder} ({writer.stored_dtype()})")
    return folder
