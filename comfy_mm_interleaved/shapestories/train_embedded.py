"""Training the embedded default model from scratch: one command, every stage in order, all resumable.

``python -m comfy_mm_interleaved train-embedded --out output/embedded`` runs the recipe
``configs/recipes/embedded.yaml`` (:mod:`.recipe`):

1. **vae**: a fresh model of :func:`.embedded.embedded_config` (seeded); its ``AutoencoderKL`` is trained alone on
   ShapeStories renders (:mod:`..train.autoencoder`), its ``scaling_factor`` set from the latent statistics, and
   the whole model saved with the tokenizer as ``OUT/init`` (skipped when that folder exists);
2. **the recipe's stages**, in order: the project's training loop (:mod:`..train.loop`) with the stage's config and
   overrides, from the previous stage's model folder (the first: ``OUT/init``), checkpoints in
   ``OUT/stages/NN_name/run`` (resumed from the newest valid one; SIGTERM saves one and stops the command), then
   ``export-checkpoint`` of its newest checkpoints into ``OUT/stages/NN_name/model`` (skipped once that exists);
3. **export**: the last stage's model folder as ``--export`` (default ``OUT/model``), plus ``training_report.json``
   (command, invocations, git revision, machine, every stage's steps, losses and wall time) and loss curves as PNG.

Evaluate the result with ``python -m comfy_mm_interleaved eval shapes --model OUT/model``.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..eval import git_revision
from .embedded import build_embedded_tokenizer, embedded_config
from .generate import random_attributes
from .recipe import DEFAULT_RECIPE, Recipe
from .render import render_array

REPORT_FILE = "training_report.json"
COMMANDS_FILE = "commands.txt"
STAGE_FILE = "stage.json"  # a finished stage's summary, in its model folder (written before the folder's rename)
WALL_FILE = "wall_seconds.json"  # each stage's training time, added up across resumes


def image_batches(batch_size: int, size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches [B, 3, size, size] in [-1, 1] of random ShapeStories images."""
    rng = np.random.default_rng([seed, 7])
    while True:
        arr = np.stack([render_array(random_attributes(rng), size) for _ in range(batch_size)])
        yield torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def stage_vae(out: Path, vae_steps: int, seed: int, batch_size: int = 16) -> Path:
    """Stage 1: the initial model folder ``OUT/init`` with a trained, frozen VAE."""
    from ..checkpoint import save_pretrained
    from ..models.mm_interleaved import MMInterleaved
    from ..train.autoencoder import (
        AutoencoderTraining,
        latent_scaling_factor,
        reconstruction_error,
        train_autoencoder,
    )

    init = out / "init"
    if (init / "config.json").is_file():
        print(f"[vae] {init} exists; skipping the VAE stage", flush=True)
        return init
    torch.manual_seed(seed)
    config = embedded_config()
    model = MMInterleaved(config)
    vae = model.image_decoder.decoder.vae
    size = config.image_decoder.image_size
    settings = AutoencoderTraining(steps=vae_steps)
    start = time.perf_counter()

    def log(row: dict[str, float]) -> None:
        print(
            f"[vae] step {row['step']:5d}  loss {row['loss']:.4f}  l1 {row['l1']:.4f}  mse {row['mse']:.4f}  "
            f"kl {row['kl']:.2f}  {row['seconds']:.0f}s",
            flush=True,
        )

    rows = train_autoencoder(vae, image_batches(batch_size, size, seed), settings, seed=seed, on_log=log)
    held_out = next(image_batches(256, size, seed + 1000))
    scaling = latent_scaling_factor(vae, held_out, torch.Generator().manual_seed(seed))
    vae.register_to_config(scaling_factor=scaling)
    config.image_decoder.vae["scaling_factor"] = scaling
    error = reconstruction_error(vae, held_out)
    print(f"[vae] scaling_factor {scaling:.4f}; held-out reconstruction error {error:.4f}", flush=True)
    tmp = out / "init.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(model, tmp, config=config)
    build_embedded_tokenizer(config).save_pretrained(str(tmp / "tokenizer"))
    report = {
        "steps": vae_steps,
        "batch_size": batch_size,
        "settings": settings.__dict__,
        "seconds": time.perf_counter() - start,
        "scaling_factor": scaling,
        "held_out_reconstruction_mae": error,
        "log": rows,
    }
    (tmp / "vae_training.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    tmp.rename(init)
    return init


def read_metrics(csv_path: Path) -> dict[str, list[tuple[int, float]]]:
    """``metrics.csv`` (step, time, tag, value rows) -> tag -> [(step, value)]."""
    import csv

    series: dict[str, list[tuple[int, float]]] = {}
    if not csv_path.is_file():
        return series
    with open(csv_path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            try:
                series.setdefault(row["tag"], []).append((int(row["step"]), float(row["value"])))
            except (KeyError, ValueError):
                continue
    return series


def finished_summary(folder: Path) -> dict[str, Any] | None:
    """The ``stage.json`` of the stage in ``folder`` (``OUT/stages/NN_name``), or None while it is not finished."""
    path = folder / "model" / STAGE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


class StageStopped(Exception):
    """A stage's training was stopped by a signal (its checkpoint is saved): the same command resumes it."""


def newest_checkpoints(checkpoints: Path, step: int, count: int) -> list[Path]:
    """The ``count`` newest valid checkpoints up to ``step``, newest first (a clear error when there are fewer)."""
    from ..train.checkpointing import list_checkpoints, verify_checkpoint

    found = [f for s, f in list_checkpoints(checkpoints) if s <= step and verify_checkpoint(f, False) is None]
    if len(found) < count:
        raise FileNotFoundError(
            f"{checkpoints}: {len(found)} valid checkpoints up to step {step}, the stage exports the mean of {count}; "
            "keep more (train.keep_last) or save more often (train.save_every), or lower export_average"
        )
    return found[:count]


def rehearse(cfg, export_average: int) -> None:  # noqa: ANN001
    """Shorten a stage to a few steps, checkpointing every step, keeping a cut schedule cut (``--rehearse``)."""
    t = cfg.train
    steps = max(2, export_average)
    t.max_steps, t.stop_at = (steps + 1, steps) if t.stop_at is not None else (steps, None)
    t.save_every, t.keep_last = 1, max(t.keep_last, export_average)


def run_stage(
    recipe: Recipe,
    index: int,
    out: Path,
    init: Path,
    overrides: list[str],
    timings: dict[str, float],
    rehearsal: bool = False,
) -> Path:
    """Train stage ``index`` from the model folder ``init`` (resuming from its newest checkpoint) and export it as
    ``OUT/stages/NN_name/model`` with a ``stage.json`` summary; a stage whose model folder exists is skipped.
    ``rehearsal``: only a few steps (:func:`rehearse`)."""
    from ..train.checkpointing import read_trainer_state
    from ..train.config import TrainConfig
    from ..train.export import export_checkpoint
    from ..train.loop import train

    stage, folder = recipe.stages[index], recipe.folder(out, index)
    model = folder / "model"
    if finished_summary(folder) is not None:
        print(f"[{stage.name}] {model} exists; skipping the stage", flush=True)
        return model
    cfg = TrainConfig.load(
        stage.config_path(),
        [
            f"model.init_from={init}",
            f"model.tokenizer={init / 'tokenizer'}",
            f"train.output_dir={folder / 'run'}",
            *stage.set,
            *overrides,
        ],
    )
    if rehearsal:
        rehearse(cfg, stage.export_average)
    print(f"[{stage.name}] stage {index + 1} of {len(recipe.stages)}: {stage.config} from {init}", flush=True)
    start = time.perf_counter()
    try:
        result = train(cfg)
    finally:
        timings[stage.name] = timings.get(stage.name, 0.0) + time.perf_counter() - start
        (out / WALL_FILE).write_text(json.dumps(timings), encoding="utf-8")
    if result.stopped_by_signal:
        raise StageStopped(f"[{stage.name}] stopped at step {result.step} with a checkpoint; run the command again")
    sources = newest_checkpoints(folder / "run" / "checkpoints", result.step, stage.export_average)
    tmp = model.with_name(model.name + ".tmp")
    export_checkpoint(sources, init, tmp, stage.export_set, overwrite=True, drop=stage.export_drop)
    series = read_metrics(folder / "run" / "metrics.csv")
    summary = {
        "name": stage.name,
        "config": stage.config,
        "overrides": [*stage.set, *overrides],
        "from": str(init),
        "steps": result.step,
        "averaged_checkpoints": [read_trainer_state(f)["step"] for f in sources],
        "export_set": stage.export_set,
        "export_drop": stage.export_drop,
        "final_losses": {tag: v[-1][1] for tag, v in series.items() if tag.startswith("loss") and v},
        "note": stage.note,
    }
    (tmp / STAGE_FILE).write_text(json.dumps(summary, indent=1), encoding="utf-8")
    tmp.rename(model)
    print(f"[{stage.name}] step {result.step} -> {model}", flush=True)
    return model


def stage_export(recipe: Recipe, out: Path, export: Path, command: str, timings: dict[str, float]) -> Path:
    """The last stage's model folder as ``export``, plus ``training_report.json`` (every stage) and loss curves over
    all stages (steps counted from the first stage's start)."""
    from ..checkpoint import build_empty_model, read_config
    from .plot import line_chart

    stages, series, offset = [], {}, 0
    for index, stage in enumerate(recipe.stages):
        folder = recipe.folder(out, index)
        summary = finished_summary(folder)
        if summary is None:
            raise FileNotFoundError(f"stage {stage.name!r} is not finished ({folder / 'model'} is missing): run it")
        summary["wall_seconds"] = timings.get(stage.name)
        stages.append(summary)
        for tag, values in read_metrics(folder / "run" / "metrics.csv").items():
            series.setdefault(tag, []).extend((offset + s, v) for s, v in values if s <= summary["steps"])
        offset += summary["steps"]
    last = recipe.folder(out, len(recipe.stages) - 1) / "model"
    tmp = export.with_name(export.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(last, tmp)
    (tmp / STAGE_FILE).unlink()
    for tag, name in (("loss_txt", "loss_text.png"), ("loss_img", "loss_image.png"), ("loss", "loss_total.png")):
        if series.get(tag):
            title = f"{tag}: training batches, all stages (grey: logged, blue: moving average)"
            line_chart(series[tag], title, tmp / name)
    init = out / "init"
    vae_report = json.loads((init / "vae_training.json").read_text(encoding="utf-8"))
    history = out / COMMANDS_FILE
    report = {
        "command": command,
        "invocations": history.read_text(encoding="utf-8").splitlines() if history.is_file() else [command],
        "git_revision": git_revision(),  # {"commit", "modified"} of the code that exported
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "recipe": dataclasses.asdict(recipe),
        "steps": offset,
        "stages": stages,
        "wall_seconds": {"vae": vae_report["seconds"], **{s["name"]: s["wall_seconds"] for s in stages}},
        "vae": {k: v for k, v in vae_report.items() if k != "log"},
        "final_losses": stages[-1]["final_losses"],
        "parameters": sum(p.numel() for p in build_empty_model(read_config(tmp)[0]).parameters()),
    }
    (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1), encoding="utf-8")
    if export.exists():
        shutil.rmtree(export)
    tmp.rename(export)
    print(f"[export] {len(stages)} stages, {offset} steps -> {export}", flush=True)
    return export


def stage_status(recipe: Recipe, out: Path, overrides: list[str], timings: dict[str, float]) -> list[str]:
    """One line a stage: done (with its steps), stopped at a checkpoint (step k of n), or not started."""
    from ..train.checkpointing import latest_valid_checkpoint, read_trainer_state
    from ..train.config import TrainConfig

    lines = [f"vae: {'done' if (out / 'init' / 'config.json').is_file() else 'not started'}"]
    for index, stage in enumerate(recipe.stages):
        folder = recipe.folder(out, index)
        spent = f", {timings[stage.name]:.0f} s so far" if stage.name in timings else ""
        summary = finished_summary(folder)
        if summary is not None:
            lines.append(f"{stage.name}: done, {summary['steps']} steps{spent} ({folder / 'model'})")
            continue
        target = TrainConfig.load(stage.config_path(), [*stage.set, *overrides]).train.last_step
        checkpoint = latest_valid_checkpoint(folder / "run" / "checkpoints", check_hashes=False)
        if checkpoint is None:
            lines.append(f"{stage.name}: not started ({target} steps)")
        else:
            step = read_trainer_state(checkpoint)["step"]
            lines.append(f"{stage.name}: at step {step} of {target}{spent} (resumes from {checkpoint})")
    return lines


def add_arguments(parser) -> None:  # noqa: ANN001
    parser.add_argument("--out", type=Path, default=Path("output/embedded"), help="working folder (resumable)")
    parser.add_argument("--export", type=Path, default=None, help="model folder to write (default OUT/model)")
    parser.add_argument(
        "--recipe", type=Path, default=DEFAULT_RECIPE, help="stages to run (default configs/recipes/embedded.yaml)"
    )
    parser.add_argument("--vae-steps", type=int, default=None, help="VAE training steps (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the initial weights and the VAE data")
    parser.add_argument(
        "--stage",
        choices=("all", "vae", "export", "status"),
        default="all",
        help="all (default): every stage, then the export; vae: only the VAE stage; export: only the final export; "
        "status: print where each stage stands and change nothing",
    )
    parser.add_argument("--until", default=None, help="stop after this stage (vae or a recipe stage's name)")
    parser.add_argument(
        "--rehearse",
        action="store_true",
        help="check the whole recipe in minutes: 3 VAE steps (unless --vae-steps) and a few steps per stage; add "
        "--set data.batch_size=2 --set train.num_workers=0 on a small machine",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads of torch (default: $MMI_NUM_THREADS, else torch's)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="training-config override for every stage, e.g. --set train.num_workers=0 (repeatable)",
    )


def run(args, argv: list[str] | None = None) -> int:  # noqa: ANN001
    """Run the VAE stage and the recipe's stages in order (each resumes or is skipped when done), then export; the
    wall time of each stage is added up in ``OUT/wall_seconds.json`` across resumes."""
    import logging
    import os
    import shlex

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    recipe = Recipe.load(args.recipe)
    if args.vae_steps is not None or args.rehearse:
        recipe.vae_steps = args.vae_steps if args.vae_steps is not None else 3
        if recipe.vae_steps < 1:
            raise ValueError(f"--vae-steps {recipe.vae_steps}: the VAE stage needs at least 1 step")
    if args.seed is not None:
        recipe.seed = args.seed
    if args.until is not None and args.until not in ("vae", *recipe.names()):
        raise ValueError(f"--until {args.until!r} is not a stage of {args.recipe}: vae, {', '.join(recipe.names())}")
    threads = args.threads if args.threads is not None else int(os.environ.get("MMI_NUM_THREADS", "0"))
    if threads:
        torch.set_num_threads(threads)
    command = "python -m comfy_mm_interleaved train-embedded " + shlex.join(argv if argv is not None else sys.argv[2:])
    timings_path = args.out / WALL_FILE
    timings = json.loads(timings_path.read_text(encoding="utf-8")) if timings_path.is_file() else {}
    if args.stage == "status":
        print("\n".join(stage_status(recipe, args.out, args.set, timings)), flush=True)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / COMMANDS_FILE, "a", encoding="utf-8") as history:  # every invocation, for the report
        history.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {command}\n")
    export = args.export or args.out / "model"
    if args.stage == "export":
        stage_export(recipe, args.out, export, command, timings)
        return 0
    model = stage_vae(args.out, recipe.vae_steps, recipe.seed, recipe.vae_batch_size)
    if args.stage == "vae" or args.until == "vae":
        return 0
    try:
        for index, stage in enumerate(recipe.stages):
            model = run_stage(recipe, index, args.out, model, args.set, timings, args.rehearse)
            if stage.name == args.until:
                print(f"[{stage.name}] --until {stage.name}: its model is {model}", flush=True)
                return 0
    except StageStopped as stopped:
        print(stopped, flush=True)
        return 0
    stage_export(recipe, args.out, export, command, timings)
    return 0
