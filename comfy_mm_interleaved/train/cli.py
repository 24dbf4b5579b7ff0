"""``train`` subcommand: ``python -m comfy_mm_interleaved train --config FILE [section.key=value ...]``.

Works the same under ``accelerate launch [--config_file ACCEL.yaml] -m comfy_mm_interleaved train ...``.
"""

from __future__ import annotations

import argparse
import logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training config (YAML or JSON), see configs/train/")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=100")


def add_train_subcommand(subparsers) -> argparse.ArgumentParser:  # noqa: ANN001
    parser = subparsers.add_parser("train", help="pretrain or fine-tune a model (accelerate; see docs/TRAINING.md)")
    add_arguments(parser)
    parser.set_defaults(func=run_train)
    return parser


def run_train(args: argparse.Namespace) -> int:
    from .config import TrainConfig
    from .loop import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = train(TrainConfig.load(args.config, args.overrides))
    state = "stopped by signal" if result.stopped_by_signal else "finished"
    logging.getLogger(__name__).info("%s at step %d; last checkpoint %s", state, result.step, result.last_checkpoint)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m comfy_mm_interleaved.train", description=__doc__)
    add_arguments(parser)
    return run_train(parser.parse_args(argv))
