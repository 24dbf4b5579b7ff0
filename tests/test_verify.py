"""``verify``: every weights file against the SHA-256 its index recorded, the tensors against the config; and the
cleanup of folders that a killed save left behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from comfy_mm_interleaved.checkpoint import (
    CONFIG_FILE,
    INDEX_FILE,
    OWNER_FILE,
    CheckpointError,
    CheckpointWriter,
    file_sha256,
    from_pretrained,
    read_index,
    save_pretrained,
)
from comfy_mm_interleaved.cli import main
from comfy_mm_interleaved.config import MMInterleavedConfig
from comfy_mm_interleaved.inference.engine import EMBEDDED_MODEL_DIR
from comfy_mm_interleaved.verify import OK, UNHASHED, verify_folder
from conftest import golden_dir


@pytest.fixture(scope="module")
def tiny_config() -> MMInterleavedConfig:
    return MMInterleavedConfig.from_official_tiny(golden_dir() / "tiny_config.json")


@pytest.fixture()
def saved(tmp_path: Path, tiny_config) -> Path:
    reference = load_file(str(golden_dir() / "tiny_official_state_dict.safetensors"))
    return save_pretrained(reference, tmp_path / "model", config=tiny_config, max_shard_bytes=200_000)


def _index(folder: Path) -> dict:
    return json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))


def _flip_a_data_byte(path: Path) -> None:
    """Change one byte in the tensor data (after safetensors' 8-byte length and JSON header): the size and header
    stay valid, so only a hash can tell."""
    data = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    position = header_end + (len(data) - header_end) // 2
    data[position] ^= 0x01
    path.write_bytes(bytes(data))


def test_save_records_the_sha256_of_every_file(saved):
    index = _index(saved)
    assert len(index["files"]) > 8  # max_shard_bytes splits the larger components into several parts
    for name, entry in index["files"].items():
        assert entry["sha256"] == file_sha256(saved / name)
        assert len(entry["sha256"]) == 64
    assert not (saved / OWNER_FILE).exists()  # the writer's record stays out of the finished folder
    results = verify_folder(saved)
    assert [r.name for r in results] == [n for c in index["components"].values() for n in c["files"]]
    assert {r.status for r in results} == {OK}


def test_a_changed_byte_is_found_by_verify_only(saved):
    victim = _index(saved)["components"]["llm"]["files"][0]
    _flip_a_data_byte(saved / victim)
    from_pretrained(saved)  # loading checks sizes and headers, which still fit
    with pytest.raises(CheckpointError, match=rf"1 of \d+ weights files .* {victim} \(changed\)"):
        verify_folder(saved)
    # a component that does not hold the changed file still verifies
    assert {r.status for r in verify_folder(saved, ["unet", "vae"])} == {OK}


def test_missing_and_truncated_files_are_named(saved):
    files = _index(saved)["components"]["unet"]["files"]
    os.remove(saved / files[0])
    with open(saved / files[1], "r+b") as f:
        f.truncate(100)
    seen = []
    with pytest.raises(CheckpointError, match=r"2 of \d+ weights files") as err:
        verify_folder(saved, report=seen.append)
    assert f"{files[0]} (missing)" in str(err.value) and f"{files[1]} (wrong size)" in str(err.value)
    assert {r.name: r.status for r in seen if not r.ok} == {files[0]: "missing", files[1]: "wrong size"}
    assert len(seen) == len(_index(saved)["files"])  # every file is reported, not only up to the first problem


def test_a_folder_without_hashes_has_its_tensors_read(saved):
    index = _index(saved)
    for entry in index["files"].values():
        del entry["sha256"]
    (saved / INDEX_FILE).write_text(json.dumps(index), encoding="utf-8")
    assert {r.status for r in verify_folder(saved)} == {UNHASHED}
    # a garbled header of the same size is found by reading it
    victim = index["components"]["vae"]["files"][0]
    data = bytearray((saved / victim).read_bytes())
    data[8:12] = b"\xff\xfe\x00\x01"
    (saved / victim).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{victim} \(unreadable\)"):
        verify_folder(saved)


def test_tensors_that_do_not_fit_the_config(saved):
    config = json.loads((saved / CONFIG_FILE).read_text(encoding="utf-8"))
    config["llm"]["intermediate_size"] += 8
    (saved / CONFIG_FILE).write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(CheckpointError, match="wrong shape"):
        verify_folder(saved)
    assert {r.status for r in verify_folder(saved, ["unet"])} == {OK}  # the other components still fit


def test_cli_verify(saved, capsys):
    assert main(["verify", str(saved), "--components", "llm,connector"]) == 0
    out = capsys.readouterr().out
    llm_files = _index(saved)["components"]["llm"]["files"]
    assert all(f"ok{' ' * 20}{name}" in out for name in llm_files)
    assert "unet" not in out
    assert "weights files intact, tensors fit the config" in out
    _flip_a_data_byte(saved / llm_files[-1])
    assert main(["verify", str(saved)]) == 1
    captured = capsys.readouterr()
    assert f"changed{' ' * 15}{llm_files[-1]}" in captured.out
    assert captured.err.startswith("mm-interleaved verify: error: 1 of ") and "(changed)" in captured.err
    assert main(["verify", str(saved), "--components", "llm,nope"]) == 1
    assert "unknown component(s) ['nope']" in capsys.readouterr().err


def test_the_embedded_model_is_intact():
    results = verify_folder(EMBEDDED_MODEL_DIR)
    assert len(results) == len(read_index(EMBEDDED_MODEL_DIR)["files"]) and {r.status for r in results} == {OK}


def _partial(parent: Path, name: str, suffix: str, pid: int | None) -> Path:
    folder = parent / f".{name}.partial-{suffix}"
    folder.mkdir()
    (folder / "llm-00001.safetensors").write_bytes(b"half written")
    if pid is not None:
        (folder / OWNER_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}), encoding="utf-8")
    return folder


def test_a_new_save_removes_what_a_killed_save_left(tmp_path, tiny_config):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = _partial(tmp_path, "model", "dead", dead_pid)
        alive = _partial(tmp_path, "model", "alive", running.pid)
        unknown = _partial(tmp_path, "model", "unknown", None)
        other_name = _partial(tmp_path, "model2", "dead", dead_pid)
        elsewhere = _partial(tmp_path, "model", "elsewhere", dead_pid)
        (elsewhere / OWNER_FILE).write_text(json.dumps({"pid": dead_pid, "host": "another-machine"}), encoding="utf-8")
        with CheckpointWriter(tmp_path / "model") as writer:
            assert not dead.exists()
            assert alive.exists() and unknown.exists() and other_name.exists() and elsewhere.exists()
            owner = json.loads((writer.tmp / OWNER_FILE).read_text(encoding="utf-8"))
            assert owner == {"pid": os.getpid(), "host": socket.gethostname()}
            reference = load_file(str(golden_dir() / "tiny_official_state_dict.safetensors"))
            writer.add({"soi_token": reference["soi_token"]})
            folder = writer.commit(tiny_config)
        assert not (folder / OWNER_FILE).exists() and not writer.tmp.exists()
    finally:
        running.kill()
        running.wait()
