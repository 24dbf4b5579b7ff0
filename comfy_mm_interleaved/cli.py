"""Command line: ``python -m comfy_mm_interleaved <subcommand> ...`` (also installed as ``mm-interleaved``).

Subcommands live in ``SUBCOMMANDS``. To add one (``generate``, ``train``, ``eval``...), write a function that
declares its arguments and one that runs it, and register them::

    def _generate_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("model_dir")

    @subcommand("generate", "generate interleaved text and images", _generate_arguments)
    def _generate(args: argparse.Namespace) -> int:
        ...  # import heavy modules here, not at the top of this file
        return 0

A subcommand group (``eval TASK``) keeps its own registry: ``subcommand(..., registry=TASKS)`` registers into it and
:func:`add_subcommands` adds its parsers (see ``comfy_mm_interleaved/eval``).

User errors (``ValueError`` and subclasses such as ``CheckpointError``, missing files, an output that exists) print
one ``error:`` message on stderr and exit with status 1, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import MMInterleavedConfig

PROG = "mm-interleaved"


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(
    name: str,
    help: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    registry: dict[str, Subcommand] | None = None,
) -> Callable[[Callable[[argparse.Namespace], int | None]], Callable[[argparse.Namespace], int | None]]:
    """Register ``run(args) -> exit status`` as the subcommand ``name`` (of ``registry``, default the top level)."""
    commands = SUBCOMMANDS if registry is None else registry

    def register(run: Callable[[argparse.Namespace], int | None]) -> Callable[[argparse.Namespace], int | None]:
        if name in commands:
            raise ValueError(f"subcommand {name!r} is registered twice")
        commands[name] = Subcommand(name, help, add_arguments, run)
        return run

    return register


def add_subcommands(
    parser: argparse.ArgumentParser, registry: dict[str, Subcommand], dest: str, run_attribute: str = "run"
) -> None:
    """One sub-parser per registered subcommand; the chosen one's ``run`` lands in ``args.<run_attribute>``."""
    commands = parser.add_subparsers(dest=dest, metavar=dest.upper(), required=True)
    for command in registry.values():
        sub = commands.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(**{run_attribute: command.run})


# ----------------------------------------------------------------------------------------------------------------
# convert-official


def _convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="official release folder (pytorch_model-*.bin + index)")
    parser.add_argument("dst", type=Path, help="new model folder to write")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--config", type=Path, default=None, help="our config.json or a golden tiny_config.json (default: 13B)"
    )
    parser.add_argument("--max-shard-gib", type=float, default=4.0, help="largest safetensors file (GiB)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model folder at DST")


@subcommand("convert-official", "convert the official MM-Interleaved release to a model folder", _convert_arguments)
def _convert(args: argparse.Namespace) -> int:
    from .convert import convert_official

    if not 0 < args.max_shard_gib < 2**20:  # also refuses nan and inf
        raise ValueError(f"--max-shard-gib must be a positive number of GiB, got {args.max_shard_gib}")
    convert_official(
        args.src,
        args.dst,
        dtype=args.dtype,
        config=args.config,
        max_shard_bytes=int(args.max_shard_gib * 2**30),
        overwrite=args.overwrite,
        log=lambda message: print(message, file=sys.stderr),
    )
    print(args.dst)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# convert-inception (comfy_mm_interleaved/eval/inception_convert.py)


def _convert_inception_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="pt_inception-2015-12-05-6726825d.pth (pytorch-fid's FID weights)")
    parser.add_argument("dst", type=Path, help="safetensors file to write (pass it to eval as --inception)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file at DST")


@subcommand(
    "convert-inception",
    "convert the standard FID Inception weights (.pth) to safetensors, once",
    _convert_inception_arguments,
)
def _convert_inception(args: argparse.Namespace) -> int:
    from .eval.inception_convert import convert_inception

    convert_inception(args.src, args.dst, args.overwrite, log=lambda message: print(message, file=sys.stderr))
    print(args.dst)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# info


def _info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", type=Path, help="a model folder (config.json + weights_index.json)")


def _config_summary(config: MMInterleavedConfig) -> list[str]:
    llm, vit = config.llm, config.visual_tokenizer.encoder
    dec = config.image_decoder
    return [
        f"LLM: {llm.num_hidden_layers} layers, hidden {llm.hidden_size}, {llm.num_attention_heads} heads, "
        f"FFN {llm.intermediate_size}, MMFS in layers {llm.mmfs_layer_indices()}",
        f"vocabulary: {config.txt_vocab_size} ({config.orig_vocab_size} text + BOI + image token), "
        f"{config.num_img_token} visual tokens per image",
        f"vision: CLIP ViT {vit.num_hidden_layers} layers, hidden {vit.hidden_size}, patch {vit.patch_size}, "
        f"{vit.image_size} px; pyramid channels {config.image_embed_dim}",
        f"image decoder: {dec.image_size} px, UNet channels {dec.unet.get('block_out_channels')}, "
        f"prompt {dec.prompt_length} x {dec.resampler.hidden_size}",
    ]


@subcommand("info", "summarise a model folder: config, parameters per component, dtypes, size", _info_arguments)
def _info(args: argparse.Namespace) -> int:
    from .checkpoint import COMPONENTS, human_bytes, read_config, read_index, read_tensor_specs

    config, fmt = read_config(args.model_dir)
    index = read_index(args.model_dir)
    specs = read_tensor_specs(args.model_dir)
    on_disk = {name: (args.model_dir / name).stat().st_size for name in index["files"]}
    total_disk = sum(on_disk.values())
    print(f"model folder: {args.model_dir}")
    print(f"format: {fmt['name']} v{fmt['version']}, stored dtype {fmt['dtype']}, {human_bytes(total_disk)} on disk")
    for line in _config_summary(config):
        print(f"  {line}")
    header = f"{'component':<18}{'tensors':>9}{'parameters':>15}{'files':>7}{'on disk':>13}  dtypes"
    print(header)
    print("-" * len(header))
    for component in COMPONENTS:
        entry = index["components"].get(component)
        if entry is None:
            continue
        keys = [k for k, f in index["weight_map"].items() if f in set(entry["files"])]
        elements = sum(_numel(specs[k][0]) for k in keys)
        dtypes = Counter(str(specs[k][1]).removeprefix("torch.") for k in keys)
        size = sum(on_disk[f] for f in entry["files"])
        dtype_text = ", ".join(f"{name} x{count}" for name, count in dtypes.most_common())
        print(
            f"{component:<18}{len(keys):>9}{elements:>15,}{len(entry['files']):>7}{human_bytes(size):>13}  {dtype_text}"
        )
    total_elements = sum(_numel(shape) for shape, _ in specs.values())
    print(f"{'total':<18}{len(specs):>9}{total_elements:>15,}{len(on_disk):>7}{human_bytes(total_disk):>13}")
    hashed = sum(isinstance(entry.get("sha256"), str) for entry in index["files"].values())
    print(f"SHA-256 recorded for {hashed} of {len(index['files'])} files", end="")
    print(f"; check them with: verify {args.model_dir}" if hashed else " (re-save the folder to record them)")
    return 0


def _verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", type=Path, help="a model folder (config.json + weights_index.json)")
    parser.add_argument(
        "--components", default=None, help="comma-separated components to check (default: all), e.g. llm,unet"
    )


@subcommand(
    "verify",
    "check a model folder in full: every weights file against the SHA-256 in its index, the tensors against the config",
    _verify_arguments,
)
def _verify(args: argparse.Namespace) -> int:
    from .checkpoint import human_bytes
    from .verify import OK, UNHASHED, FileCheck, verify_folder

    def report(result: FileCheck) -> None:
        size = (args.model_dir / result.name).stat().st_size if (args.model_dir / result.name).is_file() else 0
        detail = f"  ({result.detail})" if result.detail else ""
        print(f"{result.status:<22}{result.name:<40}{human_bytes(size):>10}{detail}", flush=True)

    components = None if args.components is None else [c.strip() for c in args.components.split(",") if c.strip()]
    results = verify_folder(args.model_dir, components, report=report, log=lambda line: print(line, flush=True))
    unhashed = sum(r.status == UNHASHED for r in results)
    intact = sum(r.status in (OK, UNHASHED) for r in results)
    print(f"{args.model_dir}: {intact} weights files intact, tensors fit the config", end="")
    print(f" ({unhashed} without a recorded hash: re-save the folder to record them)" if unhashed else "")
    return 0


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


# ----------------------------------------------------------------------------------------------------------------
# train (comfy_mm_interleaved/train/cli.py; light imports until it runs)


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    from .train.cli import add_arguments

    add_arguments(parser)


@subcommand("train", "pretrain or fine-tune a model with accelerate (see docs/TRAINING.md)", _train_arguments)
def _train(args: argparse.Namespace) -> int:
    from .train.cli import run_train

    return run_train(args)


# ----------------------------------------------------------------------------------------------------------------
# export-checkpoint (comfy_mm_interleaved/train/export.py; light imports until it runs)


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    from .train.export import add_arguments

    add_arguments(parser)


@subcommand(
    "export-checkpoint",
    "turn training checkpoints (step_N, several: their mean) into a model folder with the base folder's config",
    _export_arguments,
)
def _export(args: argparse.Namespace) -> int:
    from .train.export import run

    return run(args)


# ----------------------------------------------------------------------------------------------------------------
# train-embedded (comfy_mm_interleaved/shapestories/train_embedded.py; light imports until it runs)


def _train_embedded_arguments(parser: argparse.ArgumentParser) -> None:
    from .shapestories.train_embedded import add_arguments

    add_arguments(parser)


@subcommand(
    "train-embedded",
    "train the embedded ShapeStories model from scratch: VAE, the recipe's stages, export (docs/TRAINING.md)",
    _train_embedded_arguments,
)
def _train_embedded(args: argparse.Namespace) -> int:
    from .shapestories.train_embedded import run

    return run(args)


# ----------------------------------------------------------------------------------------------------------------
# generate (comfy_mm_interleaved/inference/cli.py; light imports until it runs)


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    from .inference.cli import add_arguments

    add_arguments(parser)


@subcommand(
    "generate",
    "continue interleaved documents with text and images (JSON / JSONL in, JSON + PNG out)",
    _generate_arguments,
)
def _generate(args: argparse.Namespace) -> int:
    from .inference.cli import run_generate

    return run_generate(args)


# ----------------------------------------------------------------------------------------------------------------
# eval TASK (comfy_mm_interleaved/eval; light imports until it runs)


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    from .eval import add_arguments

    add_arguments(parser)


@subcommand(
    "eval",
    "evaluate a model on a benchmark: eval TASK (shapes, coco-caption, flickr30k, nocaps, vqav2, okvqa, textvqa, "
    "vizwiz, coco-t2i, lncoco-t2i, fid; see docs/EVALUATION.md)",
    _eval_arguments,
)
def _eval(args: argparse.Namespace) -> int:
    return int(args.run_task(args) or 0)


# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="MM-Interleaved: checkpoints, generation, training, evaluation."
    )
    add_subcommands(parser, SUBCOMMANDS, dest="command")
    return parser


def apply_environment() -> None:
    """Check and apply the ``MMI_*`` variables every command honours, before any work: ``MMI_NUM_THREADS`` (torch's
    CPU threads) and ``MMI_MSDA_BACKEND`` (a bad value would otherwise surface deep inside the first model call)."""
    threads = os.environ.get("MMI_NUM_THREADS", "").strip()
    if threads:
        if not threads.isdigit() or int(threads) < 1:
            raise ValueError(f"MMI_NUM_THREADS must be a whole number >= 1, got {threads!r}")
        import torch

        torch.set_num_threads(int(threads))
    if os.environ.get("MMI_MSDA_BACKEND", "").strip():
        import torch

        from .ops.backend import interpreting, requested_backend, triton_importable

        backend = requested_backend()  # ValueError naming the variable and its choices
        if backend == "triton" and not (triton_importable() and (torch.cuda.is_available() or interpreting())):
            raise ValueError(
                "MMI_MSDA_BACKEND=triton needs Triton and a CUDA GPU (or TRITON_INTERPRET=1 to run the kernels in "
                "Triton's CPU interpreter); unset it to use the default"
            )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m comfy_mm_interleaved`` and of the ``mm-interleaved`` script."""
    args = build_parser().parse_args(argv)
    try:
        apply_environment()
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError) as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
