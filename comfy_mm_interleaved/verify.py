"""Check a model folder in full without building the model: ``python -m comfy_mm_interleaved verify MODEL_DIR``.

Loading checks what is cheap (file sizes, safetensors headers, the tensor set against the config); it cannot see a
changed byte inside a file's data. ``verify_folder`` also reads every weights file once and compares its SHA-256
with the one the index recorded when the folder was written. A folder written before hashes were recorded has every
tensor read instead, which finds truncated or garbled files but not changed values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import (
    INDEX_FILE,
    CheckpointError,
    _files_of,
    _open_safetensors,
    check_tensors,
    component_of,
    expected_tensor_specs,
    file_sha256,
    format_list,
    parse_components,
    read_config,
    read_index,
    read_tensor_specs,
)

OK = "ok"
UNHASHED = "ok, no hash recorded"  # every tensor read back, but values cannot be compared
NOT_LISTED = "not in the index"  # a stray weights file: never loaded, reported only
PROBLEMS = ("missing", "wrong size", "changed", "unreadable", "hash missing")


@dataclass(frozen=True)
class FileCheck:
    name: str
    status: str  # OK, UNHASHED, NOT_LISTED or one of PROBLEMS
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status not in PROBLEMS


def check_file(folder: Path, name: str, index: dict, hash_required: bool = False) -> FileCheck:
    """One weights file of ``folder`` against its entry in the index (``hash_required``: the other files have a
    recorded hash, so a file without one had it removed from the index)."""
    path = folder / name
    entry = index["files"].get(name, {})
    if not path.exists():
        return FileCheck(name, "missing", f"{path} does not exist")
    if not path.is_file():
        return FileCheck(name, "unreadable", f"{path} is not a file")
    size, expected_size = path.stat().st_size, entry.get("size_bytes")
    if expected_size is not None and size != expected_size:
        return FileCheck(name, "wrong size", f"{size} bytes, the index recorded {expected_size}")
    expected_hash = entry.get("sha256")
    if expected_hash is None and hash_required:
        return FileCheck(name, "hash missing", "the index records no SHA-256 for it, but does for the other files")
    try:
        if expected_hash is not None:
            actual = file_sha256(path)
            if actual != expected_hash:
                detail = f"SHA-256 {actual[:16]}..., the index recorded {expected_hash[:16]}..."
                return FileCheck(name, "changed", detail)
            return FileCheck(name, OK)
        with _open_safetensors(folder, name, index) as f:
            for key in f.keys():
                f.get_tensor(key)
    except (CheckpointError, OSError, RuntimeError, ValueError) as err:
        return FileCheck(name, "unreadable", str(err))
    return FileCheck(name, UNHASHED)


def verify_folder(
    folder: str | Path,
    components: Iterable[str] | None = None,
    report: Callable[[FileCheck], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[FileCheck]:
    """Check every weights file of the chosen ``components`` (default all) and, when all files are intact, the
    tensors they hold against the config. ``report`` is called once per file as soon as it is checked (weights
    files the index does not list come last, as ``NOT_LISTED``); ``log`` gets a line before each stage.

    Raises ``CheckpointError`` naming every file that is missing, truncated, changed, unreadable or stripped of its
    hash, or the tensors that do not fit the config; returns the per-file results otherwise.
    """
    folder = Path(folder)
    config, _ = read_config(folder)
    index = read_index(folder)
    chosen = parse_components(components)
    names = _files_of(index, chosen)
    hash_required = any(isinstance(entry.get("sha256"), str) for entry in index["files"].values())
    if log is not None:
        log(f"checking {len(names)} weights files of {folder}")

    def checks() -> Iterator[FileCheck]:
        for name in names:
            yield check_file(folder, name, index, hash_required)
        if components is None:  # weights files the index does not list: reported only
            for path in sorted(folder.glob("*.safetensors")):
                if path.name not in index["files"]:
                    yield FileCheck(path.name, NOT_LISTED, "ignored when loading")

    results = []
    for result in checks():
        results.append(result)
        if report is not None:
            report(result)
    bad = [r for r in results if not r.ok]
    if bad:
        listed = format_list([f"{r.name} ({r.status})" for r in bad], 8)
        raise CheckpointError(
            f"{len(bad)} of {len(names)} weights files in {folder} do not match {INDEX_FILE}: {listed}; re-convert "
            "the official checkpoint (convert-official) or copy the folder again"
        )
    if log is not None:
        log("checking the tensors against the config")
    expected = {key: spec for key, spec in expected_tensor_specs(config).items() if component_of(key) in chosen}
    fix = "re-convert the official checkpoint with the matching --config"
    check_tensors(read_tensor_specs(folder, chosen), expected, str(folder), fix)
    return results
