"""Our checkpoint format: a folder of per-component safetensors files, an index and ``config.json``.

Layout of a model folder::

    config.json           MMInterleavedConfig.to_dict() + {"checkpoint_format": {name, version, dtype}}
    weights_index.json    key -> file, per-component file lists and totals, per-file sizes and
                          SHA-256 (written last; ``verify`` checks the files against it)
    llm-00001.safetensors llm-00002.safetensors ... visual_tokenizer-00001.safetensors ... vae-00001.safetensors

Tensors keep their full official names (``mm_decoder.layers.0.self_attn.q_proj.weight``), so a folder loads into
``MMInterleaved`` with ``load_state_dict(strict=True)``. Each component can be loaded alone and onto its own device.
A folder is written into a hidden temporary sibling and renamed into place only when complete, so an interrupted
save never leaves a half-written model behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import MMInterleavedConfig
from .partial_writes import WriterLock, partial_prefix, remove_abandoned_writes

FORMAT_NAME = "comfy_mm_interleaved"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
INDEX_FILE = "weights_index.json"
FORMAT_KEY = "checkpoint_format"  # the extra entry of config.json next to the model config
DEFAULT_MAX_SHARD_BYTES = 4 * 2**30

# (official key prefix, or an exact key, -> component), first match wins: the specific image-decoder parts first.
_ROUTES: tuple[tuple[str, str], ...] = (
    ("image_decoder.decoder.unet.", "unet"),
    ("image_decoder.decoder.mmfs_module.", "unet_mmfs"),
    ("image_decoder.decoder.vae.", "vae"),
    ("image_decoder.", "image_decoder"),
    ("visual_tokenizer.", "visual_tokenizer"),
    ("mm_decoder.", "llm"),
    ("text_decoder.", "text_decoder"),
    ("context_feat_proj.", "connector"),
    ("soi_token", "connector"),
    ("context_embed_gate", "connector"),
)
COMPONENTS: tuple[str, ...] = (
    "visual_tokenizer",
    "llm",
    "text_decoder",
    "connector",
    "image_decoder",
    "unet",
    "unet_mmfs",
    "vae",
)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Fixed tables and normalisation constants stay float32 on disk whatever the storage dtype (they are tiny, and a
# float32 load then gets them back exactly); loading in a lower precision casts them like every float tensor.
_FLOAT32_ON_DISK = frozenset({"pos_embed", "clip_mean", "clip_std"})

DeviceMap = str | torch.device | Mapping[str, "str | torch.device"]
TensorSpec = tuple[tuple[int, ...], torch.dtype]


class CheckpointError(ValueError):
    """A model folder or a source checkpoint is missing, incomplete, corrupt or does not fit the config."""


# ----------------------------------------------------------------------------------------------------------------
# Small shared helpers


def component_of(key: str) -> str:
    """The component that stores the official tensor name ``key`` (see ``COMPONENTS``)."""
    for prefix, component in _ROUTES:
        if key.startswith(prefix) if prefix.endswith(".") else key == prefix or key.startswith(prefix + "."):
            return component
    raise CheckpointError(
        f"tensor {key!r} belongs to no MM-Interleaved component; expected a name starting with one of "
        f"{sorted({p for p, _ in _ROUTES})}"
    )


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``, restricted to the supported floating dtypes."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise CheckpointError(f"unsupported dtype {dtype!r}; choose one of {sorted(DTYPES)}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_components(components: Iterable[str] | None) -> tuple[str, ...]:
    """``None`` means every component; unknown names are an error."""
    if components is None:
        return COMPONENTS
    chosen = tuple(dict.fromkeys(components))
    if not chosen:
        raise CheckpointError(f"no component named; known components: {list(COMPONENTS)}")
    unknown = [c for c in chosen if c not in COMPONENTS]
    if unknown:
        raise CheckpointError(f"unknown component(s) {unknown}; known components: {list(COMPONENTS)}")
    return chosen


def device_for(component: str, device: DeviceMap | None) -> torch.device:
    """Resolve a single device or a ``{component: device}`` map (unnamed components go to the CPU)."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, Mapping):
        parse_components(device)
        return torch.device(device.get(component, "cpu"))
    return torch.device(device)


def format_list(items: Iterable[Any], limit: int = 12) -> str:
    """``a, b, c, ... (+N more)``: long key lists stay readable in error messages."""
    items = [str(i) for i in items]
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _is_fixed_table(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in _FLOAT32_ON_DISK


def _disk_dtype(key: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """``dtype`` for floating tensors (float32 for the fixed tables); integer tensors and ``dtype=None`` keep theirs."""
    if dtype is None or not tensor.is_floating_point():
        return tensor.dtype
    return torch.float32 if _is_fixed_table(key) else dtype


def _stored_tensor(key: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The contiguous CPU tensor written for ``key``."""
    if tensor.device.type == "meta":
        raise CheckpointError(f"tensor {key!r} is on the meta device (never loaded); load every weight before saving")
    return tensor.detach().to(device="cpu", dtype=_disk_dtype(key, tensor, dtype)).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Durable file writes


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_folder(path: Path) -> None:
    """Make renames inside ``path`` durable; best effort (Windows cannot open a folder for fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then fsync and rename to ``path``: readers never see a partial file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    _fsync_file(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, data: Any) -> None:
    _write_durably(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8"))


def file_sha256(path: str | Path, chunk_bytes: int = 16 * 2**20) -> str:
    """Hex SHA-256 of a file, read in chunks (a multi-GB weights file never sits in memory whole)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _unshare_storage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): give each its own copy."""
    seen: set[int] = set()
    out = {}
    for key, tensor in tensors.items():
        ptr = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if ptr in seen and tensor.numel() else tensor
        seen.add(ptr)
    return out


def _is_our_folder(folder: Path) -> bool:
    """A model folder this library wrote: its index or its config.json carries our format name (a Hugging Face or
    official folder, which also has a config.json, is not one)."""
    for name, key in ((INDEX_FILE, "format"), (CONFIG_FILE, FORMAT_KEY)):
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        entry = data.get(key) if isinstance(data, dict) else None
        if entry == FORMAT_NAME or (isinstance(entry, dict) and entry.get("name") == FORMAT_NAME):
            return True
    return False


def _written_files(folder: Path) -> set[str]:
    """The entries of a model folder that a save writes (the rest, e.g. ``tokenizer/``, belongs to the user)."""
    names = {CONFIG_FILE, INDEX_FILE}
    try:
        names |= set(json.loads((folder / INDEX_FILE).read_text(encoding="utf-8")).get("files", {}))
    except (OSError, ValueError, AttributeError):
        pass
    return names


def _check_destination(folder: Path, overwrite: bool) -> None:
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder} exists and is not a folder; choose another destination")
    if folder.is_dir() and any(folder.iterdir()):
        if not overwrite:
            raise CheckpointError(
                f"{folder} already exists and is not empty; choose a new folder or pass --overwrite (overwrite=True)"
            )
        if not _is_our_folder(folder):
            raise CheckpointError(
                f"refusing to overwrite {folder}: it is not a model folder written by {FORMAT_NAME} (neither its "
                f"{INDEX_FILE} nor its {CONFIG_FILE} names that format); choose an empty or new folder"
            )


class CheckpointWriter:
    """Write a model folder incrementally; nothing appears at ``folder`` until ``commit`` succeeds.

    ``add`` may be called many times (e.g. once per source shard); each call writes its tensors immediately as
    ``<component>-<k>.safetensors`` parts of at most ``max_shard_bytes`` (a larger single tensor gets its own part),
    so the caller can free them. Use as a context manager: leaving the block without ``commit`` (an exception)
    deletes the temporary folder.
    """

    def __init__(
        self,
        folder: str | Path,
        dtype: str | torch.dtype | None = None,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        overwrite: bool = False,
    ) -> None:
        if max_shard_bytes <= 0:
            raise CheckpointError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.folder = Path(folder).absolute()
        if self.folder.is_symlink():  # a model folder linked from another drive: replace what the link points to
            self.folder = self.folder.resolve()
        _check_destination(self.folder, overwrite)
        self.overwrite = overwrite
        self.dtype = None if dtype is None else parse_dtype(dtype)
        self.max_shard_bytes = max_shard_bytes
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned_writes(self.folder)
        self.tmp = Path(tempfile.mkdtemp(prefix=partial_prefix(self.folder), dir=self.folder.parent))
        self.tmp.chmod(0o755)  # mkdtemp makes it private; the final folder should read like any other
        self.lock = WriterLock(self.tmp)
        self.weight_map: dict[str, str] = {}
        self.files: dict[str, dict[str, Any]] = {}
        self.totals = {c: {"files": [], "num_tensors": 0, "num_elements": 0, "tensor_bytes": 0} for c in COMPONENTS}
        self.float_dtypes: set[str] = set()

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.release()
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Write ``tensors`` (official names) now, grouped by component and split into parts."""
        by_component: dict[str, list[str]] = {c: [] for c in COMPONENTS}
        for key in tensors:
            if key in self.weight_map:
                raise CheckpointError(f"tensor {key!r} was given twice")
            by_component[component_of(key)].append(key)
        for component, keys in by_component.items():
            for part in self._split(keys, tensors):
                self._write_part(component, {k: tensors[k] for k in part})

    def _split(self, keys: list[str], tensors: Mapping[str, torch.Tensor]) -> Iterator[list[str]]:
        part: list[str] = []
        size = 0
        for key in keys:
            nbytes = tensors[key].numel() * _disk_dtype(key, tensors[key], self.dtype).itemsize
            if part and size + nbytes > self.max_shard_bytes:
                yield part
                part, size = [], 0
            part.append(key)
            size += nbytes
        if part:
            yield part

    def _write_part(self, component: str, tensors: Mapping[str, torch.Tensor]) -> None:
        totals = self.totals[component]
        name = f"{component}-{len(totals['files']) + 1:05d}.safetensors"
        stored = _unshare_storage({k: _stored_tensor(k, t, self.dtype) for k, t in tensors.items()})
        metadata = {"format": "pt", "component": component}
        _write_durably(self.tmp / name, lambda tmp: save_file(stored, str(tmp), metadata=metadata))
        (self.tmp / name).chmod(0o644)  # safetensors creates files readable by their owner only
        totals["files"].append(name)
        for key, tensor in stored.items():
            self.weight_map[key] = name
            totals["num_tensors"] += 1
            totals["num_elements"] += tensor.numel()
            totals["tensor_bytes"] += tensor.numel() * tensor.element_size()
            if tensor.is_floating_point() and not _is_fixed_table(key):
                self.float_dtypes.add(dtype_name(tensor.dtype))
        path = self.tmp / name
        self.files[name] = {"component": component, "size_bytes": path.stat().st_size, "sha256": file_sha256(path)}

    def stored_dtype(self) -> str:
        if len(self.float_dtypes) == 1:
            return next(iter(self.float_dtypes))
        return "mixed" if self.float_dtypes else "float32"

    def commit(self, config: MMInterleavedConfig) -> Path:
        """Write ``config.json`` then the index (last), and move the folder into place."""
        dtype = self.stored_dtype()
        config_data = {**config.to_dict(), FORMAT_KEY: {"name": FORMAT_NAME, "version": FORMAT_VERSION, "dtype": dtype}}
        _write_json(self.tmp / CONFIG_FILE, config_data)
        components = {c: t for c, t in self.totals.items() if t["files"]}
        index = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "dtype": dtype,
            "metadata": {
                "total_size": sum(t["tensor_bytes"] for t in components.values()),
                "num_tensors": len(self.weight_map),
                "num_elements": sum(t["num_elements"] for t in components.values()),
            },
            "components": components,
            "files": self.files,
            "weight_map": dict(sorted(self.weight_map.items())),
        }
        _write_json(self.tmp / INDEX_FILE, index)
        self.lock.release()
        _fsync_folder(self.tmp)
        self._move_into_place()
        return self.folder

    def _move_into_place(self) -> None:
        if not self.folder.exists():
            os.replace(self.tmp, self.folder)
            _fsync_folder(self.folder.parent)
            return
        if not self.overwrite and any(self.folder.iterdir()):  # another save finished there meanwhile
            raise CheckpointError(
                f"{self.folder} was written by another save while this one ran; choose a new folder or pass "
                "--overwrite (overwrite=True)"
            )
        # what the user added to the old folder (tokenizer/, notes, ...) moves into the new one
        written = _written_files(self.folder)
        kept = [e.name for e in self.folder.iterdir() if e.name not in written and not (self.tmp / e.name).exists()]
        moved: list[str] = []
        old = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}.old-", dir=self.folder.parent))
        try:
            for name in kept:
                os.replace(self.folder / name, self.tmp / name)
                moved.append(name)
            os.replace(self.folder, old / "model")
            os.replace(self.tmp, self.folder)
        except BaseException:  # put the old folder and the user's files back before the partial one is deleted
            if not self.folder.exists() and (old / "model").exists():
                os.replace(old / "model", self.folder)
            for name in moved:
                os.replace(self.tmp / name, self.folder / name)
            shutil.rmtree(old, ignore_errors=True)
            raise
        _fsync_folder(self.folder.parent)
        shutil.rmtree(old, ignore_errors=True)


def save_pretrained(
    model: torch.nn.Module | Mapping[str, torch.Tensor],
    folder: str | Path,
    dtype: str | torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    config: MMInterleavedConfig | None = None,
    overwrite: bool = False,
) -> Path:
    """Save an ``MMInterleaved`` (or a state dict with official names plus ``config``) as a model folder.

    ``dtype`` casts floating tensors on disk (``None`` keeps each tensor's dtype); integer buffers stay integer and
    the fixed tables (``*pos_embed``, ``clip_mean``, ``clip_std``) stay float32.
    """
    if isinstance(model, torch.nn.Module):
        config = config or getattr(model, "config", None)
        state_dict = model.state_dict()
    else:
        state_dict = dict(model)
    if not isinstance(config, MMInterleavedConfig):
        raise CheckpointError("save_pretrained needs the MMInterleavedConfig: pass config= (the model has none)")
    with CheckpointWriter(folder, dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite) as writer:
        for component in COMPONENTS:  # one component at a time keeps the cast copies small
            writer.add({k: v for k, v in state_dict.items() if component_of(k) == component})
        return writer.commit(config)


# ----------------------------------------------------------------------------------------------------------------
# Reading and validating a folder

_RECONVERT = "re-convert the official checkpoint (python -m comfy_mm_interleaved convert-official SRC DST) or re-save"


def read_config(folder: str | Path) -> tuple[MMInterleavedConfig, dict[str, Any]]:
    """``(config, checkpoint_format)`` from ``folder/config.json``."""
    path = Path(folder) / CONFIG_FILE
    if Path(folder).is_file():
        raise CheckpointError(f"{folder} is a file; give the model folder (the one holding {CONFIG_FILE})")
    if not Path(folder).is_dir():
        raise CheckpointError(f"model folder {folder} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_FILE}, so it is not a converted model folder; {_RECONVERT}")
    data = _read_json_file(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object (a damaged config); {_RECONVERT}")
    fmt = data.pop(FORMAT_KEY, None)
    if not isinstance(fmt, dict) or fmt.get("name") != FORMAT_NAME:
        raise CheckpointError(f"{path} lacks the '{FORMAT_KEY}' entry of a {FORMAT_NAME} model folder; {_RECONVERT}")
    try:
        return MMInterleavedConfig.from_dict(data), fmt
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: {err}; fix the value or {_RECONVERT}") from None


def _read_json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); {_RECONVERT}") from None


def _is_file_name(name: object) -> bool:
    """A plain file name inside the folder (no folder part, no ``..``)."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _index_problem(index: dict[str, Any]) -> str | None:
    """What is malformed in an index's tables, or None."""
    if not isinstance(index.get("format_version", 0), int):
        return f"format_version is {index['format_version']!r}, not a number"
    for name, entry in index["files"].items():
        if not _is_file_name(name) or not isinstance(entry, dict):
            return f"the files table has a bad entry {name!r}: {entry!r:.60}"
        if not isinstance(entry.get("size_bytes", 0), int) or not isinstance(entry.get("sha256", ""), str | None):
            return f"the files table's entry {name!r} has a bad size or hash: {entry!r:.100}"
    for component, entry in index["components"].items():
        files = entry.get("files") if isinstance(entry, dict) else None
        if not isinstance(files, list) or not all(_is_file_name(f) for f in files):
            return f"component {component!r} has no list of file names: {entry!r:.60}"
    if not all(_is_file_name(f) for f in index["weight_map"].values()):
        return "the weight map names a file outside the folder"
    return None


def read_index(folder: str | Path) -> dict[str, Any]:
    """The validated ``weights_index.json`` of ``folder``."""
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {INDEX_FILE} (an interrupted save or conversion?); {_RECONVERT}")
    index = _read_json_file(path)
    if not isinstance(index, dict) or index.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a {FORMAT_NAME} index; {_RECONVERT}")
    for key in ("weight_map", "files", "components"):
        if not isinstance(index.get(key), dict):
            raise CheckpointError(f"{path} has no valid '{key}' table (a damaged index); {_RECONVERT}")
    problem = _index_problem(index)
    if problem:
        raise CheckpointError(f"{path}: {problem} (a damaged index); {_RECONVERT}")
    if index.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {index['format_version']}, newer than this library supports "
            f"({FORMAT_VERSION}); upgrade comfy_mm_interleaved"
        )
    return index


def _files_of(index: dict[str, Any], components: tuple[str, ...]) -> list[str]:
    return [name for c in components for name in index["components"].get(c, {}).get("files", [])]


@contextlib.contextmanager
def _open_safetensors(folder: Path, name: str, index: dict[str, Any], device: str = "cpu") -> Iterator[Any]:
    """Open one weights file after checking it exists and has the size the index recorded."""
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"{INDEX_FILE} lists {name}, but {path} is missing; {_RECONVERT}")
    expected = index["files"].get(name, {}).get("size_bytes")
    actual = path.stat().st_size
    if expected is not None and actual != expected:
        raise CheckpointError(
            f"{path} is truncated or corrupt ({actual} bytes, the index recorded {expected}); {_RECONVERT}"
        )
    try:
        handle = safe_open(str(path), framework="pt", device=device)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}); {_RECONVERT}") from None
    with handle as f:
        keys = set(f.keys())
        listed = {k for k, v in index["weight_map"].items() if v == name}
        if keys != listed:
            raise CheckpointError(
                f"{path} does not hold the tensors the index lists (missing: {format_list(sorted(listed - keys))}; "
                f"extra: {format_list(sorted(keys - listed))}); {_RECONVERT}"
            )
        yield f


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def read_tensor_specs(folder: str | Path, components: Iterable[str] | None = None) -> dict[str, TensorSpec]:
    """``key -> (shape, dtype)`` from the file headers only (no tensor data is read)."""
    folder = Path(folder)
    index = read_index(folder)
    specs = {}
    for name in _files_of(index, parse_components(components)):
        with _open_safetensors(folder, name, index) as f:
            for key in f.keys():
                view = f.get_slice(key)
                specs[key] = (tuple(view.get_shape()), _SAFETENSORS_DTYPES.get(view.get_dtype(), torch.float32))
    return specs


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def load_state_dict_from_folder(
    folder: str | Path,
    components: Iterable[str] | None = None,
    dtype: str | torch.dtype | None = None,
    device: DeviceMap | None = None,
) -> dict[str, torch.Tensor]:
    """Official-name state dict of the chosen ``components`` (default all).

    ``dtype`` casts floating tensors (``None``: as stored); integer buffers stay integer. ``device`` is a device or
    a ``{component: device}`` map; tensors are read straight onto it.
    """
    folder = Path(folder)
    index = read_index(folder)
    target = None if dtype is None else parse_dtype(dtype)
    state_dict = {}
    for component in parse_components(components):
        where = device_for(component, device)
        for name in _files_of(index, (component,)):
            with _open_safetensors(folder, name, index, device=str(where)) as f:
                for key in f.keys():
                    state_dict[key] = _cast(f.get_tensor(key), target)
    return state_dict


# ----------------------------------------------------------------------------------------------------------------
# Checking a set of tensors against what a config expects


def _layer_indices(keys: Iterable[str], pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := regex.match(k))})


def _dim(key: str, axis: int) -> Callable[[Mapping[str, Any]], Any]:
    return lambda specs: specs[key][axis] if specs.get(key) is not None else None


def _count(pattern: str) -> Callable[[Mapping[str, Any]], Any]:
    return lambda specs: len(_layer_indices(specs, pattern)) or None


_VIT = "visual_tokenizer.encoder.vision_model."
# (config field it reflects, how to read it from {key: shape or None}); used to explain mismatches.
_SIZE_PROBES: tuple[tuple[str, Callable[[Mapping[str, Any]], Any]], ...] = (
    ("llm.num_hidden_layers", _count(r"mm_decoder\.layers\.(\d+)\.")),
    ("llm MMFS layers (llm.mmfs_every)", lambda s: _layer_indices(s, r"mm_decoder\.layers\.(\d+)\.llama_cross_attn")),
    ("llm.hidden_size", _dim("mm_decoder.norm.weight", 0)),
    ("llm.intermediate_size", _dim("mm_decoder.layers.0.mlp.gate_proj.weight", 0)),
    ("txt_vocab_size", _dim("mm_decoder.embed_tokens.weight", 0)),
    (
        "visual_tokenizer.encoder.num_hidden_layers",
        _count(r"visual_tokenizer\.encoder\.vision_model\.encoder\.layers\.(\d+)\."),
    ),
    ("visual_tokenizer.encoder.hidden_size", _dim(_VIT + "embeddings.class_embedding", 0)),
    ("visual_tokenizer.resampler.num_queries", _dim("visual_tokenizer.perceiver_resampler.queries", 1)),
    ("visual_tokenizer.resampler.hidden_size", _dim("visual_tokenizer.perceiver_resampler.queries", 2)),
    (
        "visual_tokenizer.resampler.num_hidden_layers",
        _count(r"visual_tokenizer\.perceiver_resampler\..*\.layer\.(\d+)\."),
    ),
    ("image_decoder.resampler.hidden_size", _dim("image_decoder.perceiver_resampler.queries", 2)),
    ("image_decoder.unet.block_out_channels[0]", _dim("image_decoder.decoder.unet.conv_in.weight", 0)),
    (
        "image_decoder.mmfs.value_dim",
        _dim("image_decoder.decoder.mmfs_module.mmfs_mid_block.mmfs.value_proj.weight", 0),
    ),
)


def describe_size_differences(actual: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """Human-readable size differences between two ``{key: shape or None}`` maps (checkpoint vs config)."""
    lines = []
    for field, probe in _SIZE_PROBES:
        got, want = probe(actual), probe(expected)
        if got is not None and want is not None and got != want:
            lines.append(f"{field}: checkpoint {got}, config {want}")
    return lines


def check_tensor_specs(
    actual: Mapping[str, tuple[int, ...] | None],
    expected: Mapping[str, TensorSpec],
    source: str,
    fix: str,
    dtypes: Mapping[str, torch.dtype] | None = None,
) -> None:
    """Raise a ``CheckpointError`` listing missing, unexpected, mis-shaped and mis-typed tensors of ``source``.

    ``actual`` maps keys to shapes (``None``: only the key is known yet, e.g. from an index file); ``dtypes``, when
    known, their dtypes: a floating tensor where the model has an integer one (or the reverse) is refused, since a
    cast would not make it right (precision differences are fine: they are cast on load).
    """
    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected))
    misshaped = sorted(
        f"{k} {list(actual[k])} (expected {list(expected[k][0])})"
        for k in set(actual) & set(expected)
        if actual[k] is not None and tuple(actual[k]) != tuple(expected[k][0])
    )
    mistyped = sorted(
        f"{k} {dtype_name(dtype)} (expected {dtype_name(expected[k][1])})"
        for k, dtype in (dtypes or {}).items()
        if k in expected and dtype.is_floating_point != expected[k][1].is_floating_point
    )
    if not (missing or unexpected or misshaped or mistyped):
        return
    problems = [f"{source}: the tensors do not match the model built from the config:"]
    if missing:
        problems.append(f"  {len(missing)} missing tensor(s): {format_list(missing)}")
    if unexpected:
        problems.append(f"  {len(unexpected)} unexpected tensor(s): {format_list(unexpected)}")
    if misshaped:
        problems.append(f"  {len(misshaped)} tensor(s) with the wrong shape: {format_list(misshaped, 6)}")
    if mistyped:
        problems.append(
            f"  {len(mistyped)} tensor(s) of the wrong kind (integer vs floating point): {format_list(mistyped, 6)}"
        )
    sizes = describe_size_differences(actual, {k: shape for k, (shape, _) in expected.items()})
    if sizes:
        problems.append("  sizes that differ: " + "; ".join(sizes))
    problems.append(f"  fix: {fix}")
    raise CheckpointError("\n".join(problems))


def check_tensors(specs: Mapping[str, TensorSpec], expected: Mapping[str, TensorSpec], source: str, fix: str) -> None:
    """:func:`check_tensor_specs` of tensors whose shapes and dtypes are both known (file headers, shards)."""
    shapes = {key: shape for key, (shape, _) in specs.items()}
    dtypes = {key: dtype for key, (_, dtype) in specs.items()}
    check_tensor_specs(shapes, expected, source, fix, dtypes)


# ----------------------------------------------------------------------------------------------------------------
# Building the model without materialising its weights


_IMAGE_DECODER_COMPONENTS = frozenset({"image_decoder", "unet", "unet_mmfs", "vae"})


def build_empty_model(config: MMInterleavedConfig, components: Iterable[str] | None = None) -> torch.nn.Module:
    """``MMInterleaved(config)`` with parameters on the meta device and real (CPU) buffers.

    Buffers stay real so that non-persistent ones (computed in ``__init__``, absent from the checkpoint) keep their
    values; parameters cost no memory until weights are assigned. With ``components``, the visual tokenizer and the
    image decoder are left out of the model when none of their components is listed.
    """
    from accelerate import init_empty_weights

    from .models.mm_interleaved import MMInterleaved

    chosen = set(parse_components(components))
    with init_empty_weights(include_buffers=False):
        return MMInterleaved(
            config,
            with_visual_tokenizer="visual_tokenizer" in chosen,
            with_image_decoder=bool(chosen & _IMAGE_DECODER_COMPONENTS),
        )


def expected_tensor_specs(config: MMInterleavedConfig) -> dict[str, TensorSpec]:
    """``key -> (shape, dtype)`` of ``MMInterleaved(config).state_dict()``, from an empty build."""
    return {k: (tuple(v.shape), v.dtype) for k, v in build_empty_model(config).state_dict().items()}


def from_pretrained(
    folder: str | Path,
    dtype: str | torch.dtype = "float32",
    device: DeviceMap = "cpu",
    components: Iterable[str] | None = None,
) -> torch.nn.Module:
    """Build ``MMInterleaved`` from a model folder without a float32 copy of the weights, in eval mode.

    ``dtype`` (float32 / bfloat16 / float16) applies to every floating parameter and persistent buffer; integer
    buffers stay integer and non-persistent buffers keep the dtype the model computed them in. ``device`` is one
    device or a ``{component: device}`` map. With ``components`` only those parts are loaded: the visual tokenizer
    and the image decoder are left out of the model when none of their components is listed (e.g. a text-only
    model from ``["llm", "text_decoder", "connector"]``); other unlisted parameters stay on the meta device.
    """
    folder = Path(folder)
    config, _ = read_config(folder)
    chosen = parse_components(components)
    target = parse_dtype(dtype)
    model = build_empty_model(config, chosen)
    expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items() if component_of(k) in set(chosen)}
    fix = f"the weights do not fit config.json; {_RECONVERT}"
    check_tensors(read_tensor_specs(folder, chosen), expected, f"model folder {folder}", fix)
    state_dict = load_state_dict_from_folder(folder, chosen, dtype=target, device=device)
    model.load_state_dict(state_dict, strict=components is None, assign=True)
    _move_non_persistent_buffers(model, chosen, device)
    return model.eval()


def _move_non_persistent_buffers(model: torch.nn.Module, components: tuple[str, ...], device: DeviceMap) -> None:
    """Buffers absent from the state dict (computed in ``__init__``) follow their component's device."""
    persistent = set(model.state_dict())
    for full_name, buffer in list(model.named_buffers()):
        if full_name in persistent or not full_name.startswith(tuple(p for p, c in _ROUTES if c in components)):
            continue
        module_name, _, name = full_name.rpartition(".")
        model.get_submodule(module_name).register_buffer(
            name, buffer.to(device_for(component_of(full_name), device)), persistent=False
        )
