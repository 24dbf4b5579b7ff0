"""``python -m comfy_mm_interleaved eval TASK ...``: benchmarks of a model folder.

Each task is a subcommand of the ``eval`` group, registered in :data:`EVAL_TASKS` by the module that implements it
(listed in :data:`TASK_MODULES`)::

    def _coco_arguments(parser: argparse.ArgumentParser) -> None:
        add_model_arguments(parser)
        ...

    @eval_task("coco-caption", "COCO captioning: CIDEr", _coco_arguments)
    def _coco(args: argparse.Namespace) -> int:
        ...  # heavy imports here

Tasks: ``shapes`` (:mod:`.shapes`, the ShapeStories benchmark); ``coco-caption``, ``flickr30k``, ``nocaps``
(:mod:`.caption`); ``vqav2``, ``okvqa``, ``textvqa``, ``vizwiz`` (:mod:`.vqa`); ``coco-t2i``, ``lncoco-t2i``, ``fid``
(:mod:`.t2i`). Resumable run folders: :mod:`.runs`. What every task's report shares (the model folder, its config
hash, the code revision) comes from :func:`model_record` and :func:`git_revision`.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..cli import Subcommand, add_subcommands, subcommand

EVAL_TASKS: dict[str, Subcommand] = {}
# imported (and so registered) when the eval parser is built
TASK_MODULES: tuple[str, ...] = ("shapes", "t2i", "caption", "vqa")
PACKAGE_ROOT = Path(__file__).resolve().parents[1]

Run = Callable[[argparse.Namespace], int | None]


def eval_task(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]) -> Callable[[Run], Run]:
    """Register ``run(args) -> exit status`` as ``eval <name>``."""
    return subcommand(name, help, add_arguments, registry=EVAL_TASKS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``eval`` group's parser: one sub-parser per task; the task's ``run`` lands in ``args.run_task``."""
    for module in TASK_MODULES:
        importlib.import_module(f".{module}", __name__)
    add_subcommands(parser, EVAL_TASKS, dest="task", run_attribute="run_task")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model`` and the placement options every task shares."""
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the embedded model)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads of torch (default: $MMI_NUM_THREADS, else torch's)"
    )


def check_ranges(checks: dict[str, bool], rule: str) -> None:
    """Raise one ValueError naming every option whose check (option -> passed) failed, followed by ``rule``."""
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise ValueError(f"{', '.join(bad)} out of range: {rule}")


def model_record(folder: Path, embedded: bool) -> dict[str, Any]:
    """Which model was evaluated: its folder and the SHA-256 of its ``config.json``."""
    from ..checkpoint import CONFIG_FILE

    config = folder / CONFIG_FILE
    return {
        "folder": str(folder.resolve()),
        "embedded": embedded,
        "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest(),
    }


def git_revision() -> dict[str, Any] | None:
    """The commit of the code (and whether the work tree has changes), or None outside a git checkout."""

    def git(*arguments: str) -> str:
        command = ["git", "-C", str(PACKAGE_ROOT), *arguments]
        return subprocess.run(command, capture_output=True, text=True, check=True, timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        changed = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "modified": changed}


def load_engine(args: argparse.Namespace) -> tuple[Any, dict[str, Any], float]:
    """Set torch's threads, load the engine of ``--model`` (the embedded model without it) and return it, its
    :func:`model_record` and the loading time in seconds."""
    import torch

    from ..inference.engine import InterleavedEngine, resolve_model_dir

    threads = args.threads if args.threads is not None else int(os.environ.get("MMI_NUM_THREADS", "0"))
    if threads < 0:
        raise ValueError(f"--threads must be >= 1 (or 0 for torch's default), got {threads}")
    if threads:
        torch.set_num_threads(threads)
    folder = resolve_model_dir(args.model)
    start = time.perf_counter()
    engine = InterleavedEngine.from_pretrained(folder, dtype=args.dtype, device=args.device)
    return engine, model_record(folder, embedded=args.model is None), time.perf_counter() - start
