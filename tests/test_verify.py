"""``verify``: every weights file against the SHA-256 its index recorded, the tensors against the config; and the
cleanup of folders that a killed save left behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from comfy_mm_interleaved import partial_writes, verify
from comfy_mm_interleaved.checkpoint import (
    CONFIG_FILE,
    INDEX_FILE,
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
from comfy_mm_interleaved.partial_writes import OWNER_FILE
from comfy_mm_interleaved.verify import NOT_LISTED, OK, UNHASHED, verify_folder
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


HOLD_A_WRITER = """
import sys, time
from comfy_mm_interleaved.checkpoint import CheckpointWriter
writer = CheckpointWriter(sys.argv[1])
print(writer.tmp, flush=True)
time.sleep(300)
"""


def _writer_process(destination: Path) -> tuple[subprocess.Popen, Path]:
    """A real save into ``destination`` that stops half-way (its partial folder and lock exist) and waits."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_A_WRITER, str(destination)], stdout=subprocess.PIPE, text=True
    )
    return process, Path(process.stdout.readline().strip())


def test_a_new_save_removes_what_a_killed_save_left(tmp_path, tiny_config):
    destination = tmp_path / "model"
    killed, killed_partial = _writer_process(destination)
    running, running_partial = _writer_process(destination)
    try:
        assert json.loads((killed_partial / OWNER_FILE).read_text(encoding="utf-8")) == {
            "pid": killed.pid,
            "host": socket.gethostname(),
        }
        killed.send_signal(signal.SIGKILL)  # no cleanup runs: the partial folder stays, its lock goes
        killed.wait()
        assert killed_partial.is_dir()
        no_record = tmp_path / ".model.partial-norecord"
        no_record.mkdir()
        elsewhere = tmp_path / ".model.partial-elsewhere"
        elsewhere.mkdir()
        (elsewhere / OWNER_FILE).write_text(json.dumps({"pid": 1, "host": "another-machine"}), encoding="utf-8")
        other_name = tmp_path / ".model2.partial-x"
        shutil.copytree(killed_partial, other_name)
        with CheckpointWriter(destination) as writer:
            assert not killed_partial.exists()  # its process is gone
            assert running_partial.is_dir()  # a save still running (it holds the lock), whatever its pid says
            assert no_record.is_dir() and elsewhere.is_dir() and other_name.is_dir()
            reference = load_file(str(golden_dir() / "tiny_official_state_dict.safetensors"))
            writer.add({"soi_token": reference["soi_token"]})
            folder = writer.commit(tiny_config)
        assert not (folder / OWNER_FILE).exists() and not writer.tmp.exists()
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "connector-00001.safetensors", INDEX_FILE]
    finally:
        running.kill()
        running.wait()


def test_without_flock_nothing_is_removed(tmp_path, monkeypatch):
    killed, partial = _writer_process(tmp_path / "model")
    killed.kill()
    killed.wait()
    monkeypatch.setattr(partial_writes, "fcntl", None)  # as on Windows
    partial_writes.remove_abandoned_writes(tmp_path / "model")
    assert partial.is_dir()


def test_a_hash_removed_from_the_index_and_a_stray_file(saved, capsys):
    index = _index(saved)
    victim = index["components"]["unet"]["files"][0]
    index["files"][victim]["sha256"] = None
    (saved / INDEX_FILE).write_text(json.dumps(index), encoding="utf-8")
    with pytest.raises(CheckpointError, match=rf"{victim} \(hash missing\)"):
        verify_folder(saved)
    del index["files"][victim]["sha256"]
    (saved / INDEX_FILE).write_text(json.dumps(index), encoding="utf-8")
    with pytest.raises(CheckpointError, match=rf"{victim} \(hash missing\)"):
        verify_folder(saved)
    index["files"][victim]["sha256"] = file_sha256(saved / victim)
    (saved / INDEX_FILE).write_text(json.dumps(index), encoding="utf-8")
    shutil.copy(saved / victim, saved / "llm-00099.safetensors")  # never loaded: reported, not an error
    results = verify_folder(saved)
    assert results[-1].name == "llm-00099.safetensors" and results[-1].status == NOT_LISTED
    assert main(["verify", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "not in the index" in out and f"{len(index['files'])} weights files intact" in out
    assert out.splitlines()[0] == f"checking {len(index['files'])} weights files of {saved}"


def test_an_unreadable_file_is_reported_and_the_others_still_checked(saved, monkeypatch):
    names = [n for c in _index(saved)["components"].values() for n in c["files"]]
    locked = {names[1], names[-1]}

    def hash_or_deny(path, *args):
        if Path(path).name in locked:
            raise PermissionError(13, "Permission denied", str(path))
        return file_sha256(path, *args)

    monkeypatch.setattr(verify, "file_sha256", hash_or_deny)
    seen = []
    with pytest.raises(CheckpointError, match=r"2 of \d+ weights files .* \(unreadable\)"):
        verify_folder(saved, report=seen.append)
    assert len(seen) == len(names) and {r.name for r in seen if r.status == "unreadable"} == locked
    assert "Permission denied" in next(r.detail for r in seen if r.name in locked)


def test_damaged_tables_and_configs_are_named(saved, tmp_path):
    good_index, good_config = _index(saved), (saved / CONFIG_FILE).read_text(encoding="utf-8")
    first = next(iter(good_index["files"]))
    damages = {
        "a files entry": lambda i: i["files"].update({first: 5}),
        "a hash": lambda i: i["files"][first].update(sha256=12345),
        "a size": lambda i: i["files"][first].update(size_bytes="204042"),
        "a component": lambda i: i["components"].update(llm=[]),
        "a file list": lambda i: i["components"]["llm"].update(files="llm-00001.safetensors"),
        "a path": lambda i: i["components"]["llm"]["files"].append("../elsewhere.safetensors"),
        "the version": lambda i: i.update(format_version="2"),
    }
    for what, damage in damages.items():
        index = json.loads(json.dumps(good_index))
        damage(index)
        (saved / INDEX_FILE).write_text(json.dumps(index), encoding="utf-8")
        with pytest.raises(CheckpointError, match=r"weights_index.json: .*\(a damaged index\)"):
            verify_folder(saved)
        assert main(["verify", str(saved)]) == 1, what
    (saved / INDEX_FILE).write_text(json.dumps(good_index), encoding="utf-8")
    config = json.loads(good_config)
    for value, message in (
        ([1], "is not a JSON object"),
        (
            {**config, "llm": {**config["llm"], "hidden_size": "big"}},
            "LLMConfig.hidden_size = 'big' is not a valid int",
        ),
        ({**config, "llm": None}, "MMInterleavedConfig.llm = None is not a valid LLMConfig"),
    ):
        (saved / CONFIG_FILE).write_text(json.dumps(value), encoding="utf-8")
        with pytest.raises(CheckpointError, match=rf"config.json.*{re.escape(message)}"):
            verify_folder(saved)
    (saved / CONFIG_FILE).write_bytes(b"\xff\xfe{}")
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON"):
        verify_folder(saved)
    with pytest.raises(CheckpointError, match="is a file; give the model folder"):
        verify_folder(saved / INDEX_FILE)
    (saved / CONFIG_FILE).write_text(good_config, encoding="utf-8")
    with pytest.raises(CheckpointError, match="no component named"):
        verify_folder(saved, [])
