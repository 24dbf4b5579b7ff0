"""Resumable evaluation runs: one output folder per run, per-item results appended as they are made.

A task opens its ``--out`` folder with :class:`RunFolder`, skips the items whose key is in :meth:`RunFolder.done_keys`,
appends one JSON object per finished item with :meth:`RunFolder.append` (flushed and synced, so a killed run loses at
most the item in flight) and, at the end, rebuilds its report from :meth:`RunFolder.items` and writes it with
:meth:`RunFolder.write_report`::

    run = RunFolder(args.out, settings, overwrite=args.overwrite)
    done = run.done_keys()
    for key, item in dataset:
        if key not in done:
            run.append({"key": key, ...})
    run.write_report(build_report(run.items()))

:func:`run_pending` does that loop for a task (items that cannot be made, such as one whose image is missing, raise
:class:`SkipItem` and are counted, not appended, so a rerun tries them again). The other helpers are shared by the
dataset tasks: :func:`load_json` and :func:`find_file` (clear errors for missing / malformed files, naming every place
looked at), :func:`require_field` (a malformed entry), :func:`image_folder` / :func:`load_image` /
:func:`require_some_images` (images of the annotations), :func:`add_run_arguments` (``--out --limit --overwrite
--no-progress``), :func:`add_decoding_arguments` / :func:`text_options` (beam search) and :func:`write_outputs`
(``report.json`` + ``predictions.json``).

Files in the folder: ``run_settings.json`` (the settings the items were made with; a rerun with other settings is an
error unless ``overwrite``, which starts the run again from nothing), ``items.jsonl``, ``report.json`` and, for the
tasks that use :func:`write_outputs`, ``predictions.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

SETTINGS_FILE = "run_settings.json"
ITEMS_FILE = "items.jsonl"
REPORT_FILE = "report.json"
PREDICTIONS_FILE = "predictions.json"  # a task's predictions in its benchmark's results format
KEY = "key"  # every item's unique id (a string) within its run


def load_json(path: Path, what: str) -> Any:
    """Read the JSON file ``path``; ``what`` names it in the errors (a missing file, a folder, malformed JSON)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_file():
        raise ValueError(f"{what} must be a file, but {path} is a folder")
    try:
        with path.open(encoding="utf-8") as file:
            return json.load(file)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path} is not valid JSON: {err}") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {path} is not UTF-8 text: {err}") from err


def _canonical(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` as it reads back from JSON (tuples become lists...); a TypeError names what is not JSON."""
    try:
        return json.loads(json.dumps(settings, sort_keys=True))
    except (TypeError, ValueError) as err:
        raise TypeError(f"run settings must be JSON values (str, number, bool, None, list, dict): {err}") from err


def _atomic_write(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", encoding="utf-8") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as ``{"decoding.num_beams": 5, ...}``."""
    flat: dict[str, Any] = {}
    for name, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def _setting_changes(saved: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """``name: saved -> now`` for every (nested) setting that differs."""
    saved, settings = _flatten(saved), _flatten(settings)

    def show(values: dict[str, Any], name: str) -> str:
        return json.dumps(values[name]) if name in values else "(absent)"

    names = sorted(set(saved) | set(settings))
    return [
        f"{name}: {show(saved, name)} -> {show(settings, name)}"
        for name in names
        if (name in saved) != (name in settings) or saved.get(name) != settings.get(name)
    ]


class RunFolder:
    """The output folder of one evaluation run (see the module docstring)."""

    def __init__(self, out: Path, settings: dict[str, Any], overwrite: bool = False) -> None:
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise NotADirectoryError(f"--out must be a folder, but {self.out} is a file")
        self.out.mkdir(parents=True, exist_ok=True)
        self.settings = _canonical(settings)
        self.settings_path = self.out / SETTINGS_FILE
        self.items_path = self.out / ITEMS_FILE
        self.report_path = self.out / REPORT_FILE
        if overwrite:
            self.items_path.unlink(missing_ok=True)
            self.report_path.unlink(missing_ok=True)
        elif self.settings_path.exists():
            self._check_saved_settings()
        self._drop_partial_line()
        _atomic_write(self.settings_path, json.dumps(self.settings, indent=2, sort_keys=True) + "\n")

    def _check_saved_settings(self) -> None:
        saved = load_json(self.settings_path, "saved run settings")
        if not isinstance(saved, dict):
            raise ValueError(f"saved run settings {self.settings_path} must be a JSON object; use --overwrite")
        changes = _setting_changes(saved, self.settings)
        if changes:
            raise ValueError(
                f"{self.out} holds a run made with other settings ({'; '.join(changes)}); rerun with the same "
                "settings to resume it, pass --overwrite to start it again, or choose another --out"
            )

    def items(self) -> list[dict[str, Any]]:
        """Every item appended so far, in order (a key appended twice: the last one). A last line cut short by a
        killed run is ignored (and removed when the folder is opened again)."""
        items: dict[str, dict[str, Any]] = {}
        for number, line in enumerate(self._complete_lines(), start=1):
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{self.items_path} line {number} is not valid JSON ({err}); delete the line or use --overwrite"
                ) from err
            if not isinstance(item, dict) or not isinstance(item.get(KEY), str):
                raise ValueError(f"{self.items_path} line {number} is not an item with a string {KEY!r}")
            items.pop(item[KEY], None)
            items[item[KEY]] = item
        return list(items.values())

    def done_keys(self) -> set[str]:
        """The keys of the items already done."""
        return {item[KEY] for item in self.items()}

    def append(self, item: dict[str, Any]) -> None:
        """Append one finished item (a JSON object with a string ``key``) and sync it to disk."""
        if not isinstance(item.get(KEY), str):
            raise TypeError(f"an item needs a string {KEY!r}, got {item.get(KEY)!r}")
        line = json.dumps(item, sort_keys=True)
        with self.items_path.open("a", encoding="utf-8") as file:
            file.write(line + "\n")
            file.flush()
            os.fsync(file.fileno())

    def write_report(self, report: dict[str, Any]) -> Path:
        """Write ``report.json`` atomically (a reader never sees half a report) and return its path."""
        _atomic_write(self.report_path, json.dumps(report, indent=2) + "\n")
        return self.report_path

    def _complete_lines(self) -> list[str]:
        if not self.items_path.exists():
            return []
        text = self.items_path.read_text(encoding="utf-8")
        lines = text.split("\n")[:-1]  # the text after the last newline is a line cut short (or nothing)
        return [line for line in lines if line.strip()]

    def _drop_partial_line(self) -> None:
        if not self.items_path.exists():
            return
        data = self.items_path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with self.items_path.open("r+b") as file:
                file.truncate(end)


# ----------------------------------------------------------------------------------------------------------------
# The loop over the items of a run

Item = TypeVar("Item")
MAX_LISTED_SKIPS = 20  # skipped items listed by name in a report (all are counted)


class SkipItem(Exception):
    """Raised by a task's work function: this item cannot be evaluated; ``reason`` goes into the report, ``kind``
    (such as ``missing_image``) is what the report counts."""

    def __init__(self, reason: str, kind: str = "skipped") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


@dataclass
class Skips:
    """Items skipped in this run: a count per reason and the first few keys with their reason."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: list[dict[str, str]] = field(default_factory=list)

    def add(self, key: str, reason: str, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if len(self.examples) < MAX_LISTED_SKIPS:
            self.examples.append({"key": key, "reason": reason})

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.total, "by_kind": dict(self.counts), "examples": list(self.examples)}


def run_pending(
    run: RunFolder,
    items: Sequence[tuple[str, Item]],
    work: Callable[[Item], dict[str, Any]],
    label: str,
    progress: bool = True,
) -> tuple[Skips, float]:
    """Run ``work`` on every ``(key, item)`` not done yet and append its record (``key`` and ``seconds`` added);
    an item whose ``work`` raises :class:`SkipItem` is counted, not appended. Returns the skips and the seconds spent.
    Progress lines go to stderr about every 5 %."""
    done = run.done_keys()
    pending = [(key, item) for key, item in items if key not in done]
    skips = Skips()
    every = max(1, len(pending) // 20)
    start = time.perf_counter()
    for number, (key, item) in enumerate(pending, start=1):
        began = time.perf_counter()
        try:
            record = work(item)
        except SkipItem as skip:
            skips.add(key, skip.reason, skip.kind)
            continue
        run.append({**record, "key": key, "seconds": round(time.perf_counter() - began, 4)})
        if progress and (number % every == 0 or number == len(pending)):
            print(f"{label}: {number}/{len(pending)} new items ({len(done)} done before)", file=sys.stderr)
    return skips, time.perf_counter() - start


def find_file(override: Path | None, root: Path, candidates: Iterable[str], what: str, option: str) -> Path:
    """``override`` when given (it must exist), else the first of ``root/candidate`` that exists; the error names
    every path tried and the option that points at the file."""
    if override is not None:
        if not Path(override).exists():
            raise FileNotFoundError(f"{what} not found: {override} (given with {option})")
        return Path(override)
    tried = [root / name for name in candidates]
    for path in tried:
        if path.exists():
            return path
    raise FileNotFoundError(
        f"{what} not found; looked for {', '.join(str(p) for p in tried)}; point --data at the dataset folder or "
        f"give the file with {option}"
    )


def add_run_arguments(parser: argparse.ArgumentParser, default_out: Path) -> None:
    """``--out``, ``--limit``, ``--overwrite`` and ``--no-progress`` of a resumable task."""
    parser.add_argument("--out", type=Path, default=default_out, help=f"output folder (default {default_out})")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N items (default: all)")
    parser.add_argument("--overwrite", action="store_true", help="discard the results already in --out and start again")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")


def add_data_arguments(
    parser: argparse.ArgumentParser,
    contents: str,
    files: Iterable[tuple[str, str, str]],
    images_help: str = "image folder (default: found under --data)",
) -> None:
    """``--data`` (the dataset folder holding ``contents``), one override per ``(option, what, default file name)`` and
    ``--images``."""
    parser.add_argument("--data", type=Path, required=True, help=f"dataset folder ({contents})")
    for option, what, name in files:
        parser.add_argument(option, type=Path, default=None, help=f"{what} (default: --data/{name})")
    parser.add_argument("--images", type=Path, default=None, help=images_help)


def first_items(items: list[Item], limit: int | None) -> list[Item]:
    """The first ``limit`` items (all when None); ``--limit`` must be >= 1."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    return items if limit is None else items[:limit]


def image_folder(override: Path | None, data: Path, candidates: Iterable[str]) -> Path:
    """``--images`` when given (it must be a folder), else the first candidate folder under ``data`` that exists, else
    ``data`` itself."""
    if override is not None:
        if not Path(override).is_dir():
            raise NotADirectoryError(f"--images must be a folder of images, got {override}")
        return Path(override)
    for name in candidates:
        if (data / name).is_dir():
            return data / name
    return data


def image_path(folder: Path, relative: str) -> Path:
    """Where an image of the annotations is: ``folder/relative``, else ``folder/<file name>`` (``--images`` pointing
    straight at the folder that holds the files)."""
    path = folder / relative
    return path if path.is_file() else folder / Path(relative).name


def require_some_images(folder: Path, relatives: Sequence[str]) -> None:
    """A clear error (before loading the model) when none of the images to evaluate is in ``folder``; single missing
    images are skipped and counted later."""
    if relatives and not any(image_path(folder, r).is_file() for r in relatives):
        raise FileNotFoundError(
            f"none of the {len(relatives)} images to evaluate is in {folder} (e.g. {folder / relatives[0]}); point "
            "--images at the image folder"
        )


def load_image(folder: Path, relative: str) -> Any:
    """The RGB image of an item, or :class:`SkipItem` (kind ``missing_image`` / ``unreadable_image``)."""
    from ..inference.document import load_image_file

    path = image_path(folder, relative)
    if not path.is_file():
        raise SkipItem(f"image not found: {folder / relative}", "missing_image")
    try:
        return load_image_file(path)
    except ValueError as err:
        raise SkipItem(str(err), "unreadable_image") from None


def add_decoding_arguments(
    parser: argparse.ArgumentParser, beams: int, max_new_tokens: int, min_new_tokens: int, length_penalty: float
) -> None:
    """Beam-search options of a text task; the defaults given are the official protocol's."""
    parser.add_argument("--num-beams", type=int, default=beams, help=f"beams (official: {beams})")
    parser.add_argument(
        "--max-new-tokens", type=int, default=max_new_tokens, help=f"most new tokens (official: {max_new_tokens})"
    )
    parser.add_argument(
        "--min-new-tokens",
        type=int,
        default=min_new_tokens,
        help=f"fewest new tokens before an end token may come (official: {min_new_tokens}, from the official "
        "min_length, which also counts a placeholder <s>)",
    )
    parser.add_argument(
        "--length-penalty",
        type=float,
        default=length_penalty,
        help=f"beam score = log-probability / length ** this (official: {length_penalty})",
    )


def text_options(args: argparse.Namespace) -> Any:
    """The :class:`TextOptions` of :func:`add_decoding_arguments` (deterministic beam search, stops at ``</s>`` and
    at ``<|beginofimage|>`` as the official decoding does); a ValueError names a bad value."""
    from ..inference.options import TextOptions

    options = TextOptions(
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        stop_on_image=True,
    )
    try:
        options.validate()
    except ValueError as err:
        raise ValueError(f"decoding options: {err}") from None
    return options


def write_outputs(
    run: RunFolder,
    *,
    header: dict[str, Any],
    metrics: dict[str, Any] | None,
    items: Sequence[dict[str, Any]],
    selected: int,
    skips: Skips,
    settings: dict[str, Any],
    predictions: list[dict[str, Any]],
    timings: dict[str, float],
) -> Path:
    """Write ``predictions.json`` (the benchmark's results format) and ``report.json`` (``header`` fields first,
    then metrics, counts, skipped items, settings, code revision, timings, files) and return the report's path."""
    from . import git_revision

    (run.out / PREDICTIONS_FILE).write_text(json.dumps(predictions, indent=1) + "\n", encoding="utf-8")
    report = {
        **header,
        "metrics": metrics,
        "counts": {"selected": selected, "evaluated": len(items), "skipped_this_run": skips.total},
        "skipped": skips.to_dict(),
        "settings": settings,
        "code": git_revision(),
        "timings": {
            **{name: round(seconds, 3) for name, seconds in timings.items()},
            "generation_seconds_all_items": round(sum(item.get("seconds", 0.0) for item in items), 3),
        },
        "files": {"items": ITEMS_FILE, "predictions": PREDICTIONS_FILE, "settings": SETTINGS_FILE},
    }
    return run.write_report(report)


def require_field(entry: Any, name: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``entry[name]`` of a parsed annotation entry, with a ValueError naming ``where`` when it is absent or of
    another type."""
    if not isinstance(entry, dict) or name not in entry:
        raise ValueError(f"{where} has no {name!r}")
    if not isinstance(entry[name], kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"{where}: {name!r} must be {names}, got {entry[name]!r}")
    return entry[name]
