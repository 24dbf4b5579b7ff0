"""Training configuration: one YAML/JSON file plus ``dotted.key=value`` command-line overrides.

Sections: ``model`` (what to train and from where), ``optim`` (AdamW, parameter groups, schedule), ``train``
(steps, precision, accumulation, logging, checkpoints), ``data`` (sources and packing, see ``stream.py``) and
``eval`` (held-out loss data and hooks). Unknown keys are an error, so a typo never passes silently.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .params import OFFICIAL_RULES, ParamRule
from .stream import StreamConfig


@dataclass
class ModelSection:
    config: str | None = None  # MMInterleavedConfig JSON, "official_13b", or "tiny:<golden tiny_config.json>"
    init_from: str | None = None  # checkpoint folder in our format (also one converted from the official release)
    factory: str | None = None  # "module:function" returning an nn.Module from the TrainConfig (custom models)
    factory_options: dict[str, Any] = field(default_factory=dict)  # read by the factory (its own keys)
    tokenizer: str | None = None  # local tokenizer folder (Vicuna for the real model)
    tokenizer_words: list[str] | None = None  # or: build a word-level tokenizer in-process from these words
    freeze: str = "official"  # "official" (§3.3) or "none"
    freeze_extra: list[str] = field(default_factory=list)  # more name substrings to freeze
    unfreeze: list[str] = field(default_factory=list)  # name substrings to train anyway (after the freezing)
    gradient_checkpointing: bool = False
    # this run's loss weights instead of the model config's (official: 1.0 and 10.0; its collators set one of them
    # to 0 per task), passed to the model's forward; the model config keeps its own values
    loss_txt_weight: float | None = None
    loss_img_weight: float | None = None


@dataclass
class OptimSection:
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.995])
    eps: float = 1e-6
    rules: list[ParamRule] = field(default_factory=lambda: list(OFFICIAL_RULES))
    max_grad_norm: float | None = 1.0  # None: no clipping
    schedule: str = "cosine"  # "cosine" or "constant" (both after linear warm-up)
    warmup_steps: int = 1000
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1) (AdamW's beta1, beta2), got {self.betas}")
        if self.lr <= 0 or self.eps <= 0 or self.weight_decay < 0:
            raise ValueError(
                f"optim.lr and optim.eps must be > 0 and optim.weight_decay >= 0, got lr={self.lr}, eps={self.eps}, "
                f"weight_decay={self.weight_decay}"
            )
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(
                f"optim.warmup_steps must be >= 0 and optim.min_lr_ratio in [0, 1], got {self.warmup_steps}, "
                f"{self.min_lr_ratio}"
            )


@dataclass
class TrainSection:
    output_dir: str = "output/train"
    max_steps: int = 15000  # the length of the learning-rate schedule (and of the run, unless stop_at is set)
    stop_at: int | None = None  # stop (with a checkpoint) at this step, earlier than max_steps: a cut schedule
    grad_accum: int = 1
    mixed_precision: str = "no"  # "no", "bf16", "fp16" (an accelerate config may set it too)
    seed: int = 32
    # Re-seed the model's random draws (noise, timesteps, CFG drop, dropout) from the seed and the global position
    # of each micro-batch: results then depend on the data alone, not on the number of processes or on resumes.
    seed_per_batch: bool = True
    log_every: int = 10
    save_every: int = 1000  # <= 0: no periodic or final checkpoint (SIGTERM still saves one)
    eval_every: int = 1000
    keep_last: int = 5
    resume: str = "auto"  # "auto" (latest valid checkpoint in output_dir), "none", or a checkpoint folder
    verify_checksums: bool = True
    num_workers: int = 0
    progress_bar: bool = True
    tensorboard: bool = True
    cpu: bool = False
    # DDP: which parameters take part depends on the batch (a UNet MMFS block without a source image, the image
    # decoder without decoder images), so DDP must look for unused ones; False saves a graph walk per step
    find_unused_parameters: bool = True

    def __post_init__(self) -> None:
        for name in ("max_steps", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.keep_last < 1:
            raise ValueError(f"train.keep_last must be >= 1 (checkpoints kept), got {self.keep_last}")
        if self.num_workers < 0:
            raise ValueError(f"train.num_workers must be >= 0, got {self.num_workers}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"train.mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")

    @property
    def last_step(self) -> int:
        """The step the run ends at: ``stop_at`` when set, else ``max_steps``."""
        return self.max_steps if self.stop_at is None else self.stop_at


@dataclass
class EvalSection:
    data: StreamConfig | None = None  # held-out data for an evaluation loss
    max_batches: int = 8
    seed: int = 1234  # the model's random draws (noise, timesteps) during evaluation
    hooks: list[str] = field(default_factory=list)  # "module:function"(model=, step=, accelerator=, trainer=) -> dict


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    data: StreamConfig = field(default_factory=StreamConfig)
    eval: EvalSection = field(default_factory=EvalSection)

    @classmethod
    def load(cls, path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
        raw: dict[str, Any] = {}
        if path is not None:
            text = Path(path).read_text(encoding="utf-8")
            raw = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text) or {}
        for item in overrides or []:
            apply_override(raw, item)
        return build_dataclass(cls, raw, "config")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """``a.b.c=value`` (value parsed as YAML: numbers, booleans, lists, null) into the nested dict ``raw``."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like section.key=value")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {item!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(value)


def build_dataclass(cls: type, data: Any, where: str) -> Any:
    """Build ``cls`` from nested dicts, recursing into dataclass, ``list[dataclass]`` and optional fields."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping for {cls.__name__}, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known keys: {sorted(names)}")
    return cls(**{k: convert(hints[k], v, f"{where}.{k}") for k, v in data.items()})


def convert(hint: Any, value: Any, where: str) -> Any:
    """``value`` (parsed YAML / JSON) as the field's type ``hint``; a clear error naming ``where`` otherwise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None:
            if len(inner) < len(args):
                return None
            raise ValueError(f"{where}: must be set (null is not allowed)")
        if len(inner) == 1:
            return convert(inner[0], value, where)
        dataclass_args = [a for a in inner if dataclasses.is_dataclass(a)]
        return convert(dataclass_args[0], value, where) if dataclass_args and isinstance(value, dict) else value
    if value is None:
        raise ValueError(f"{where}: must be set (null is not allowed)")
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return value
    return _scalar(hint, value, where)


def _scalar(hint: Any, value: Any, where: str) -> Any:
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
    elif hint is int:
        if not (is_number and float(value).is_integer()):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    elif hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-3" as a string
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"{where}: expected a number, got {value!r}") from None
        if not is_number:
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    elif hint is str:
        if is_number:  # e.g. output_dir=2024
            return str(value)
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted no / off as False: mixed_precision=no means "no"
            return "no" if value is False else "yes"
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
    return value
