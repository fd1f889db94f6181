"""Where the shipped configs and recipes live, installed or in a source checkout."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def config_dir() -> Path:
    """The Hydra config tree: inside the package when installed, ``configs/`` in a checkout."""
    installed = _PACKAGE_DIR / "configs"
    if (installed / "train.yaml").is_file():
        return installed
    return _PACKAGE_DIR.parent / "configs"


@dataclass(frozen=True)
class RecipeInfo:
    """What `aift recipes list` shows, read from ``configs/recipe/<name>.yaml`` without importing torch."""

    name: str
    task: str
    default_model: str
    data_format: str
    description: str
    synth: str  # "module:function" that writes a demo dataset
    schema: str  # "module:Class", the recipe's config schema
    deidentify: str = ""  # "module:function" of `aift data deidentify`, for recipes on sensitive text


def recipe_names() -> list[str]:
    return sorted(p.stem for p in (config_dir() / "recipe").glob("*.yaml"))


def recipe_info(name: str) -> RecipeInfo:
    from omegaconf import OmegaConf

    from aifactory_train.errors import ConfigError

    path = config_dir() / "recipe" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown recipe '{name}'; valid recipes: {', '.join(recipe_names())}")
    raw = OmegaConf.load(path)
    default_model = "?"
    for entry in raw.get("defaults", []):
        if isinstance(entry, str):
            continue
        for key, value in entry.items():
            if str(key).strip() in ("override /model", "/model"):
                default_model = str(value)
    recipe = raw.recipe
    return RecipeInfo(
        name=recipe.name,
        task=recipe.task,
        default_model=default_model,
        data_format=recipe.data_format,
        description=recipe.description,
        synth=recipe.synth,
        schema=recipe.schema,
        deidentify=recipe.get("deidentify", ""),
    )


def model_configs_for_task(task: str) -> list[str]:
    """Names of the model configs (configs/model/*.yaml) whose ``task`` is ``task``."""
    from omegaconf import OmegaConf

    return sorted(p.stem for p in (config_dir() / "model").glob("*.yaml") if OmegaConf.load(p).get("task") == task)


def load_object(spec: str):
    """Import ``"package.module:attribute"``."""
    module_name, _, attribute = spec.partition(":")
    return getattr(importlib.import_module(module_name), attribute)
