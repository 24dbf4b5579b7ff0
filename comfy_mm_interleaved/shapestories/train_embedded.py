"""Training the embedded default model from scratch: one command, three stages, all resumable.

``python -m comfy_mm_interleaved train-embedded --out output/embedded``:

1. **vae**: a fresh model of :func:`.embedded.embedded_config` (seeded); its ``AutoencoderKL`` is trained alone on
   ShapeStories renders (:mod:`..train.autoencoder`), its ``scaling_factor`` set from the latent statistics, and
   the whole model saved with the tokenizer as ``OUT/init`` (skipped when that folder exists);
2. **train**: the project's training loop (:mod:`..train.loop`) on the in-process ``shapestories`` source with
   ``configs/train/embedded_shapestories.yaml``, ``model.init_from=OUT/init``, checkpoints in ``OUT/run`` (resumes
   from the latest valid one; ``--minutes`` stops it cleanly with a checkpoint after that much training time);
3. **export**: the latest checkpoint's weights as a model folder (config, safetensors, tokenizer) in ``--export``
   (default ``OUT/model``), plus ``training_report.json`` and loss-curve PNGs.

Evaluate the result with ``python -m comfy_mm_interleaved eval shapes --model OUT/model``.
"""

from __future__ import annotations

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
from .render import render_array

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAIN_CONFIG = REPO_ROOT / "configs" / "train" / "embedded_shapestories.yaml"
REPORT_FILE = "training_report.json"
COMMANDS_FILE = "commands.txt"


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
    (tmp / "vae_training.json").write_text(json.dumps(report, indent=1))
    tmp.rename(init)
    return init


def stage_train(out: Path, init: Path, overrides: list[str]) -> Path:
    """Stage 2: the training loop from ``init``; checkpoints in ``OUT/run/checkpoints`` (resumes automatically)."""
    from ..train.config import TrainConfig
    from ..train.loop import train

    cfg = TrainConfig.load(
        TRAIN_CONFIG,
        [
            f"model.init_from={init}",
            f"model.tokenizer={init / 'tokenizer'}",
            f"train.output_dir={out / 'run'}",
            *overrides,
        ],
    )
    start = time.perf_counter()
    result = train(cfg)
    print(f"[train] stopped at step {result.step} after {time.perf_counter() - start:.0f}s", flush=True)
    return out / "run"


def read_metrics(csv_path: Path) -> dict[str, list[tuple[int, float]]]:
    """``metrics.csv`` (step, time, tag, value rows) -> tag -> [(step, value)]."""
    import csv

    series: dict[str, list[tuple[int, float]]] = {}
    if not csv_path.is_file():
        return series
    with open(csv_path, newline="") as handle:
        for row in csv.DictReader(handle):
            try:
                series.setdefault(row["tag"], []).append((int(row["step"]), float(row["value"])))
            except (KeyError, ValueError):
                continue
    return series


def stage_export(
    out: Path,
    init: Path,
    export: Path,
    command: str,
    wall_seconds: dict[str, float],
    checkpoint: Path | None = None,
    average: int = 1,
) -> Path:
    """Stage 3: the newest valid checkpoint (or ``checkpoint``) as a model folder + tokenizer + training report and
    loss curves. ``average`` > 1: the mean of the weights of that many newest valid checkpoints (up to
    ``checkpoint``), a cheap stand-in for an exponential moving average of the weights."""
    from ..checkpoint import build_empty_model, read_config
    from ..train.checkpointing import latest_valid_checkpoint, list_checkpoints, read_trainer_state, verify_checkpoint
    from ..train.export import export_checkpoint
    from .plot import line_chart

    run = out / "run"
    checkpoint = checkpoint or latest_valid_checkpoint(run / "checkpoints")
    if checkpoint is None:
        raise FileNotFoundError(f"no valid checkpoint under {run / 'checkpoints'}; run the train stage first")
    step = read_trainer_state(checkpoint)["step"]  # export_checkpoint checks each checkpoint's files
    sources = [checkpoint]
    if average > 1:
        older = [f for s, f in list_checkpoints(checkpoint.parent) if s < step and verify_checkpoint(f, False) is None]
        sources += older[: average - 1]
        if len(sources) < average:
            raise FileNotFoundError(f"--average {average}: only {len(sources)} valid checkpoints up to step {step}")
    tmp = export.with_name(export.name + ".tmp")
    export_checkpoint(sources, init, tmp, overwrite=True)  # weights (averaged), config, tokenizer
    series = {  # the rows up to the exported step (a later checkpoint may have logged more)
        tag: [(s, v) for s, v in values if s <= step] for tag, values in read_metrics(run / "metrics.csv").items()
    }
    for tag, name in (("loss_txt", "loss_text.png"), ("loss_img", "loss_image.png"), ("loss", "loss_total.png")):
        if series.get(tag):
            line_chart(series[tag], f"{tag}: training batches (grey: logged values, blue: moving average)", tmp / name)
    vae_report = json.loads((init / "vae_training.json").read_text())
    history = out / COMMANDS_FILE
    report = {
        "command": command,
        "invocations": history.read_text().splitlines() if history.is_file() else [command],
        "git_revision": git_revision(),  # {"commit", "modified"} of the code that exported
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "steps": step,
        "checkpoint": str(checkpoint),
        "averaged_checkpoints": [read_trainer_state(f)["step"] for f in sources],
        "train_config": str(TRAIN_CONFIG.relative_to(REPO_ROOT)),
        "wall_seconds": wall_seconds,
        "vae": {k: v for k, v in vae_report.items() if k != "log"},
        "final_losses": {tag: values[-1][1] for tag, values in series.items() if tag.startswith("loss") and values},
        "parameters": sum(p.numel() for p in build_empty_model(read_config(tmp)[0]).parameters()),
    }
    (tmp / REPORT_FILE).write_text(json.dumps(report, indent=1))
    if export.exists():
        shutil.rmtree(export)
    tmp.rename(export)
    print(f"[export] step {step} -> {export}", flush=True)
    return export


def add_arguments(parser) -> None:  # noqa: ANN001
    parser.add_argument("--out", type=Path, default=Path("output/embedded"), help="working folder (resumable)")
    parser.add_argument("--export", type=Path, default=None, help="model folder to write (default OUT/model)")
    parser.add_argument("--vae-steps", type=int, default=1200, help="VAE training steps (default 1200)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the VAE data")
    parser.add_argument("--stage", choices=("all", "vae", "train", "export"), default="all")
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="export this checkpoint folder (default: the newest valid one)"
    )
    parser.add_argument(
        "--average", type=int, default=1, help="export the mean weights of the N newest checkpoints (default 1)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads of torch (default: $MMI_NUM_THREADS, else torch's)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="training-config override, e.g. --set train.max_steps=1800 (repeatable)",
    )


def run(args, argv: list[str] | None = None) -> int:  # noqa: ANN001
    """Run the chosen stages; each stage's wall time is added up in ``OUT/wall_seconds.json`` (across resumes)."""
    import logging
    import os
    import shlex

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threads = args.threads if args.threads is not None else int(os.environ.get("MMI_NUM_THREADS", "0"))
    if threads:
        torch.set_num_threads(threads)
    command = "python -m comfy_mm_interleaved train-embedded " + shlex.join(argv if argv is not None else sys.argv[2:])
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / COMMANDS_FILE, "a", encoding="utf-8") as history:  # every invocation, for the report
        history.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {command}\n")
    timings_path = args.out / "wall_seconds.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    init = args.out / "init"
    for stage in ("vae", "train", "export"):
        if args.stage not in ("all", stage):
            continue
        start = time.perf_counter()
        if stage == "vae":
            stage_vae(args.out, args.vae_steps, args.seed)
        elif stage == "train":
            stage_train(args.out, init, args.set)
        else:
            export = args.export or args.out / "model"
            stage_export(args.out, init, export, command, timings, args.checkpoint, args.average)
            continue
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
        timings_path.write_text(json.dumps(timings))
    return 0
