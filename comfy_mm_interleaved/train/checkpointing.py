"""Training checkpoints that never lose work.

A checkpoint is a folder ``<output>/checkpoints/step_<N>`` written as ``step_<N>.tmp`` first: accelerate's
``save_state`` (model, optimiser, scheduler, grad scaler, RNG states of every process, in whatever layout the
DDP / FSDP / DeepSpeed backend uses), then ``trainer_state.json`` (step, data position), then every file is
fsync-ed, a ``manifest.json`` with each file's size and SHA-256 is written and fsync-ed, and the folder is renamed
to its final name (atomic on POSIX) and the parent folder fsync-ed. A folder without a valid manifest, or whose
files differ from it, is incomplete or corrupt and is never resumed from; the previous one is used instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
STEP_DIR = re.compile(r"^step_(\d+)$")


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` via a fsync-ed temporary file and an atomic rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def finalize_checkpoint(tmp_folder: Path, final_folder: Path) -> None:
    """fsync every file, write the manifest, then atomically rename ``tmp_folder`` to ``final_folder``."""
    files = {}
    for path in checkpoint_files(tmp_folder):
        fsync_path(path)
        files[str(path.relative_to(tmp_folder))] = {"size": path.stat().st_size, "sha256": file_digest(path)}
    write_json_atomic(tmp_folder / MANIFEST, {"files": files})
    for sub in sorted({p.parent for p in checkpoint_files(tmp_folder)} | {tmp_folder}, reverse=True):
        fsync_path(sub)
    if final_folder.exists():  # a checkpoint of the same step from an earlier, interrupted run
        shutil.rmtree(final_folder)
    os.replace(tmp_folder, final_folder)
    fsync_path(final_folder.parent)


def verify_checkpoint(folder: Path, check_hashes: bool = True) -> str | None:
    """None if ``folder`` is a complete, intact checkpoint, else the reason it is not."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no manifest (half-written)"
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"unreadable manifest ({err})"
    for rel, info in manifest.get("files", {}).items():
        path = folder / rel
        if not path.is_file():
            return f"missing file {rel}"
        if path.stat().st_size != info["size"]:
            return f"{rel} has {path.stat().st_size} bytes, manifest says {info['size']} (truncated)"
        if check_hashes and file_digest(path) != info["sha256"]:
            return f"{rel} does not match its SHA-256 (corrupt)"
    if TRAINER_STATE not in manifest.get("files", {}):
        return f"no {TRAINER_STATE}"
    return None


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of final-named checkpoint folders, newest first (validity not checked)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def latest_valid_checkpoint(root: Path, check_hashes: bool = True) -> Path | None:
    """The newest checkpoint that verifies; broken newer ones are reported and passed over."""
    for step, folder in list_checkpoints(root):
        reason = verify_checkpoint(folder, check_hashes)
        if reason is None:
            return folder
        log.warning("checkpoint %s (step %d) is unusable: %s; trying the previous one", folder, step, reason)
    return None


def prune_checkpoints(root: Path, keep_last: int, check_hashes: bool = False) -> None:
    """Keep the newest ``keep_last`` valid checkpoints; remove older ones, broken ones and leftover ``.tmp``."""
    if keep_last <= 0:
        return
    for tmp in root.glob("step_*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    kept = 0
    for _, folder in list_checkpoints(root):
        if kept < keep_last and verify_checkpoint(folder, check_hashes) is None:
            kept += 1
        elif kept >= keep_last:
            shutil.rmtree(folder, ignore_errors=True)


def read_trainer_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))
