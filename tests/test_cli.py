"""The command line: convert-official and info on the golden tiny release, and clean one-line user errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from safetensors.torch import load_file

from comfy_mm_interleaved.checkpoint import COMPONENTS, component_of, human_bytes, read_index
from comfy_mm_interleaved.cli import SUBCOMMANDS, main
from conftest import REPO_ROOT, golden_dir
from helpers_checkpoint import OFFICIAL_TINY, converted_tiny_checkpoint  # noqa: F401


def _run(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "comfy_mm_interleaved", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)


def test_convert_then_info(tmp_path):
    reference = load_file(str(golden_dir() / "tiny_official_state_dict.safetensors"))
    destination = tmp_path / "model"
    result = _run(
        "convert-official", golden_dir() / OFFICIAL_TINY, destination,
        "--dtype", "float16", "--config", golden_dir() / "tiny_config.json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(destination)
    assert "converting" in result.stderr and "Traceback" not in result.stderr
    assert read_index(destination)["dtype"] == "float16"

    info = _run("info", destination)
    assert info.returncode == 0, info.stderr
    lines = info.stdout.splitlines()
    assert "stored dtype float16" in info.stdout
    for component in COMPONENTS:
        keys = [k for k in reference if component_of(k) == component]
        row = next(line for line in lines if line.split()[0] == component)
        assert row.split()[1:3] == [str(len(keys)), f"{sum(reference[k].numel() for k in keys):,}"], row
    total = next(line for line in lines if line.startswith("total"))
    disk = sum(p.stat().st_size for p in destination.glob("*.safetensors"))
    assert total.split()[1:3] == [str(len(reference)), f"{sum(t.numel() for t in reference.values()):,}"]
    assert human_bytes(disk) in total
    files = len(read_index(destination)["files"])
    assert lines[-1] == f"SHA-256 recorded for {files} of {files} files; check them with: verify {destination}"
    verified = _run("verify", destination)
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.splitlines()[-1] == f"{destination}: {files} weights files intact, tensors fit the config"


def test_bad_paths_give_one_clear_line(tmp_path):
    missing = tmp_path / "nowhere"
    result = _run("convert-official", missing, tmp_path / "out", "--config", golden_dir() / "tiny_config.json")
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == f"mm-interleaved convert-official: error: official checkpoint folder {missing} does not exist"
    )
    assert not (tmp_path / "out").exists()

    result = _run("info", tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("mm-interleaved info: error: ") and "no config.json" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_in_process_errors(tmp_path, capsys, converted_tiny_checkpoint):  # noqa: F811
    source = str(golden_dir() / OFFICIAL_TINY)
    code = main(["convert-official", source, str(tmp_path / "out"), "--config", "/nope.json"])
    assert code == 1 and "config file /nope.json does not exist" in capsys.readouterr().err

    code = main(["convert-official", source, str(converted_tiny_checkpoint)])
    err = capsys.readouterr().err
    assert code == 1 and "already exists and is not empty" in err and "Traceback" not in err

    # the default (13B) config does not fit the tiny release: listed, nothing written
    code = main(["convert-official", source, str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and "the tensors do not match the model built from the config" in err and "--config" in err
    assert not (tmp_path / "out").exists()

    code = main(["convert-official", "a", "b", "--max-shard-gib", "0"])
    assert code == 1 and "--max-shard-gib must be a positive number of GiB" in capsys.readouterr().err


def test_usage_errors_and_registry():
    assert {"convert-official", "info"} <= set(SUBCOMMANDS)
    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["convert-official", "only-src", "--dtype", "int8"])
    assert info.value.code == 2


def test_environment_variables_are_checked_before_any_work(monkeypatch, capsys, converted_tiny_checkpoint):  # noqa: F811
    import torch

    command = ["info", str(converted_tiny_checkpoint)]
    threads = torch.get_num_threads()
    try:
        monkeypatch.setenv("MMI_NUM_THREADS", "1")
        assert main(command) == 0 and torch.get_num_threads() == 1  # honoured by every command
    finally:
        torch.set_num_threads(threads)
    for name, value, message in (
        ("MMI_NUM_THREADS", "two", "MMI_NUM_THREADS must be a whole number >= 1, got 'two'"),
        ("MMI_MSDA_BACKEND", "bogus", "MMI_MSDA_BACKEND='bogus' is not one of auto, reference, gather, triton"),
    ):
        monkeypatch.setenv(name, value)
        assert main(command) == 1
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        monkeypatch.delenv(name)
    if not torch.cuda.is_available():
        monkeypatch.setenv("MMI_MSDA_BACKEND", "triton")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert main(command) == 1
        assert "MMI_MSDA_BACKEND=triton needs Triton and a CUDA GPU" in capsys.readouterr().err
