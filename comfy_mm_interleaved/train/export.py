"""Training checkpoints -> a model folder: ``python -m comfy_mm_interleaved export-checkpoint``.

A checkpoint of the training loop (``OUT/checkpoints/step_N``) holds the weights but not the model config; the
model folder the run started from (``model.init_from``) holds the config and the tokenizer. This writes a complete
model folder (config, safetensors, ``tokenizer/``) from the two, optionally averaging several checkpoints (the mean
of the weights of the last few checkpoints: a cheap stand-in for an exponential moving average) and overriding
config fields that do not change the weights (``--set image_context_layer=2``), and records what it did in
``export.json`` beside the weights.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

EXPORT_REPORT = "export.json"


def averaged_weights(files: Sequence[Path]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the floating tensors of several state-dict files (other tensors: the first file's)."""
    from safetensors.torch import load_file

    total = load_file(str(files[0]))
    for path in files[1:]:
        for name, tensor in load_file(str(path)).items():
            if name not in total:
                raise ValueError(f"{path} has {name!r}, which {files[0]} lacks: checkpoints of different models")
            if total[name].is_floating_point():
                total[name] = total[name] + tensor
    return {k: v / len(files) if v.is_floating_point() else v for k, v in total.items()}


def checkpoint_weights(checkpoint: Path) -> Path:
    """The weights file of a valid training checkpoint folder (a clear error otherwise)."""
    from .checkpointing import verify_checkpoint

    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise FileNotFoundError(
            f"{checkpoint} is not a folder: pass a training checkpoint folder (OUT/checkpoints/step_N)"
        )
    problem = verify_checkpoint(checkpoint, check_hashes=True)
    if problem is not None:
        raise ValueError(f"{checkpoint} is not a valid checkpoint ({problem}); pick another step_N folder")
    weights = checkpoint / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{checkpoint} has no model.safetensors (a DeepSpeed/FSDP-sharded checkpoint?)")
    return weights


def export_checkpoint(
    checkpoints: Sequence[Path],
    base: Path,
    out: Path,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    drop: Sequence[str] = (),
) -> Path:
    """Write the model folder ``out``: ``base``'s config (with ``overrides``, ``key=value``) and tokenizer, and the
    mean of the weights of ``checkpoints`` (every key of ``base``'s model must be in them). Keys starting with one of
    ``drop`` (training-only heads such as ``attribute_probe.``) are left out; each prefix must match a key. Weights
    that only the overrides add (e.g. ``image_context_embeddings=true`` adds ``context_embed_gate``) keep the
    model's own initialisation and are listed in the folder's ``export.json`` as ``initialised``."""
    from ..checkpoint import read_config, save_pretrained
    from ..config import MMInterleavedConfig
    from ..eval import git_revision
    from ..models.mm_interleaved import MMInterleaved
    from .checkpointing import read_trainer_state
    from .config import apply_override

    if not checkpoints:
        raise ValueError("pass at least one training checkpoint folder")
    base, out = Path(base), Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it or choose another --out")
    files = [checkpoint_weights(Path(c)) for c in checkpoints]
    base_config, _ = read_config(base)
    raw = base_config.to_dict()
    for item in overrides:
        apply_override(raw, item)
    config = MMInterleavedConfig.from_dict(raw)
    model = MMInterleaved(config)
    added: list[str] = []
    if overrides:
        with torch.device("meta"):
            base_keys = set(MMInterleaved(base_config).state_dict())
        added = sorted(set(model.state_dict()) - base_keys)
    state = averaged_weights(files)
    for prefix in drop:
        dropped = [name for name in state if name.startswith(prefix)]
        if not dropped:
            raise ValueError(f"--drop {prefix!r} matches no weight of the checkpoints (check the prefix)")
        for name in dropped:
            del state[name]
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    missing = sorted(set(expected) - set(state) - set(added))
    unexpected = sorted(set(state) - set(expected))
    resized = [
        f"{n} {tuple(state[n].shape)} vs {expected[n]}"
        for n in expected
        if n in state and tuple(state[n].shape) != expected[n]
    ]
    if missing or unexpected or resized:
        raise ValueError(
            f"the checkpoints do not match {base}'s model: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(resized)} of another shape "
            f"(e.g. {resized[:2]}); export with the model folder the run started from"
        )
    initialised = sorted(set(added) - set(state))
    model.load_state_dict(state, strict=not initialised)
    save_pretrained(model, out, overwrite=overwrite)  # an overwritten folder keeps its tokenizer/ (not weights)
    if (base / "tokenizer").is_dir() and Path(base).resolve() != Path(out).resolve():
        shutil.copytree(base / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    report: dict[str, Any] = {
        "base": str(base),
        "dropped": list(drop),
        "checkpoints": [{"path": str(c), "step": read_trainer_state(Path(c))["step"]} for c in checkpoints],
        "overrides": list(overrides),
        "initialised": initialised,
        "git_revision": git_revision(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    (out / EXPORT_REPORT).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return out


def add_arguments(parser) -> None:  # noqa: ANN001
    parser.add_argument("checkpoints", nargs="+", type=Path, help="training checkpoint folders (step_N); several: mean")
    parser.add_argument("--base", type=Path, required=True, help="the model folder the run started from (config)")
    parser.add_argument("--out", type=Path, required=True, help="the model folder to write")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field that does not change the weights, e.g. image_context_layer=2 (repeatable)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument(
        "--drop",
        action="append",
        default=[],
        metavar="PREFIX",
        help="leave out the weights whose names start with PREFIX, e.g. a training-only attribute_probe. (repeatable)",
    )


def run(args) -> int:  # noqa: ANN001
    folder = export_checkpoint(args.checkpoints, args.base, args.out, args.overrides, args.overwrite, args.drop)
    print(f"exported {len(args.checkpoints)} checkpoint(s) -> {folder}")
    return 0
