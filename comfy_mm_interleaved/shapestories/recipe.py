"""The embedded model's training recipe: a VAE stage, then training stages run in order, each from the last one's
export (``configs/recipes/embedded.yaml``; run by ``train-embedded``, :mod:`.train_embedded`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RECIPE = REPO_ROOT / "configs" / "recipes" / "embedded.yaml"
STAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9_]*$")
RESERVED_NAMES = ("all", "vae", "export", "status")  # what train-embedded --stage / --until take besides stages


@dataclass
class RecipeStage:
    name: str  # lower-case letters, digits, "_": the folder OUT/stages/NN_<name> and a value of --until
    config: str  # training config (relative to the repository, or absolute)
    set: list[str] = field(default_factory=list)  # its overrides (key=value), e.g. train.max_steps=1200
    export_average: int = 1  # the exported weights: the mean of this many newest checkpoints
    export_set: list[str] = field(default_factory=list)  # model-config overrides at export (export-checkpoint --set)
    export_drop: list[str] = field(default_factory=list)  # weight-name prefixes left out (training-only heads)
    note: str = ""

    def config_path(self) -> Path:
        path = Path(self.config)
        return path if path.is_absolute() else REPO_ROOT / path


@dataclass
class Recipe:
    stages: list[RecipeStage] = field(default_factory=list)
    vae_steps: int = 1200
    vae_batch_size: int = 16
    seed: int = 0  # the initial weights and the VAE's data

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        from ..train.config import build_dataclass

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe {path} does not exist; the default is {DEFAULT_RECIPE}")
        recipe = build_dataclass(cls, yaml.safe_load(path.read_text(encoding="utf-8")) or {}, f"recipe {path.name}")
        recipe.validate(path)
        return recipe

    def validate(self, path: Path) -> None:
        where = f"recipe {path}"
        if not self.stages:
            raise ValueError(f"{where} has no stages; list at least one under 'stages:'")
        if self.vae_steps < 1 or self.vae_batch_size < 1:
            raise ValueError(f"{where}: vae_steps and vae_batch_size must be >= 1")
        seen: set[str] = set()
        for stage in self.stages:
            if not STAGE_NAME.match(stage.name) or stage.name in RESERVED_NAMES:
                raise ValueError(
                    f"{where}: stage name {stage.name!r} must be lower-case letters, digits and '_' (not one of "
                    f"{', '.join(RESERVED_NAMES)})"
                )
            if stage.name in seen:
                raise ValueError(f"{where}: two stages are named {stage.name!r}; names must be unique")
            seen.add(stage.name)
            if not stage.config_path().is_file():
                raise FileNotFoundError(f"{where}: stage {stage.name!r} names {stage.config}, which does not exist")
            if stage.export_average < 1:
                raise ValueError(f"{where}: stage {stage.name!r} has export_average {stage.export_average}; use >= 1")
            for item in [*stage.set, *stage.export_set]:
                if "=" not in item:
                    raise ValueError(f"{where}: stage {stage.name!r}: override {item!r} must look like key=value")

    def names(self) -> list[str]:
        return [stage.name for stage in self.stages]

    def folder(self, out: Path, index: int) -> Path:
        """``OUT/stages/NN_name``: the stage's run (checkpoints, metrics) and its exported model folder."""
        return out / "stages" / f"{index + 1:02d}_{self.stages[index].name}"
