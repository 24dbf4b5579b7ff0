"""Check a model folder in full without building the model: ``python -m comfy_mm_interleaved verify MODEL_DIR``.

Loading checks what is cheap (file sizes, safetensors headers, the tensor set against the config); it cannot see a
changed byte inside a file's data. ``verify_folder`` also reads every weights file once and compares its SHA-256
with the one the index recorded when the folder was written. A folder written before hashes were recorded has every
tensor read instead, which finds truncated or garbled files but not changed values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
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
PROBLEMS = ("missing", "wrong size", "changed", "unreadable")


@dataclass(frozen=True)
class FileCheck:
    name: str
    status: str  # OK, UNHASHED or one of PROBLEMS
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status not in PROBLEMS


def check_file(folder: Path, name: str, index: dict) -> FileCheck:
    """One weights file of ``folder`` against its entry in the index."""
    path = folder / name
    entry = index["files"].get(name, {})
    if not path.is_file():
        return FileCheck(name, "missing", f"{path} does not exist")
    size, expected_size = path.stat().st_size, entry.get("size_bytes")
    if expected_size is not None and size != expected_size:
        return FileCheck(name, "wrong size", f"{size} bytes, the index recorded {expected_size}")
    expected_hash = entry.get("sha256")
    if expected_hash is not None:
        actual = file_sha256(path)
        if actual != expected_hash:
            return FileCheck(name, "changed", f"SHA-256 {actual[:16]}..., the index recorded {expected_hash[:16]}...")
        return FileCheck(name, OK)
    try:
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
) -> list[FileCheck]:
    """Check every weights file of the chosen ``components`` (default all) and, when all files are intact, the
    tensors they hold against the config. ``report`` is called once per file as soon as it is checked.

    Raises ``CheckpointError`` naming every file that is missing, truncated, changed or unreadable, or the tensors
    that do not fit the config; returns the per-file results otherwise.
    """
    folder = Path(folder)
    config, _ = read_config(folder)
    index = read_index(folder)
    chosen = parse_components(components)
    results = []
    for name in _files_of(index, chosen):
        result = check_file(folder, name, index)
        results.append(result)
        if report is not None:
            report(result)
    bad = [r for r in results if not r.ok]
    if bad:
        listed = format_list([f"{r.name} ({r.status})" for r in bad], 8)
        raise CheckpointError(
            f"{len(bad)} of {len(results)} weights files in {folder} do not match {INDEX_FILE}: {listed}; re-convert "
            "the official checkpoint (convert-official) or copy the folder again"
        )
    expected = {key: spec for key, spec in expected_tensor_specs(config).items() if component_of(key) in set(chosen)}
    fix = "re-convert the official checkpoint with the matching --config"
    check_tensors(read_tensor_specs(folder, chosen), expected, str(folder), fix)
    return results
