"""Where the shipped configs and recipes live, installed or in a source checkout."""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
# Folders of recipes kept outside the package (written by `aift recipes copy`), separated like PATH.
RECIPES_PATH_ENV = "AIFT_RECIPES_PATH"


def config_dir() -> Path:
    """The Hydra config tree: inside the package when installed, ``configs/`` in a checkout."""
    installed = _PACKAGE_DIR / "configs"
    if (installed / "train.yaml").is_file():
        return installed
    return _PACKAGE_DIR.parent / "configs"


def user_recipe_roots() -> list[Path]:
    """The recipe folders named by ``$AIFT_RECIPES_PATH``. Each holds ``configs/recipe/<name>.yaml`` (and
    ``configs/data``, ``configs/experiment``) and the recipe's Python package ``<name>/``."""
    from aifactory_train.errors import ConfigError

    roots = []
    for entry in filter(None, os.environ.get(RECIPES_PATH_ENV, "").split(os.pathsep)):
        root = Path(entry).expanduser().resolve()
        if not (root / "configs" / "recipe").is_dir():
            raise ConfigError(f"${RECIPES_PATH_ENV}: '{entry}' is not a recipes folder: expected "
                              f"{root}/configs/recipe/<name>.yaml beside the recipe's package {root}/<name>/, as "
                              f"`aift recipes copy SOURCE NAME --to {entry}` writes")
        roots.append(root)
    return roots


def config_dirs() -> list[Path]:
    """Every Hydra config tree: the package's, then those of ``$AIFT_RECIPES_PATH``."""
    return [config_dir(), *(root / "configs" for root in user_recipe_roots())]


def use_user_recipes() -> list[str]:
    """Make the recipes of ``$AIFT_RECIPES_PATH`` usable in this process: their packages importable, and the
    Hydra override that adds their configs to the search path (empty when there are none)."""
    roots = user_recipe_roots()
    for root in reversed(roots):
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
    if not roots:
        return []
    recipe_files()  # a recipe name given twice is an error here, before Hydra silently picks one of them
    return ["hydra.searchpath=[" + ",".join(f"file://{root / 'configs'}" for root in roots) + "]"]


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
    source: str = "shipped"  # "shipped", or the $AIFT_RECIPES_PATH folder it comes from


def recipe_files() -> dict[str, Path]:
    """Recipe name -> its config file, shipped ones and those of ``$AIFT_RECIPES_PATH``. A name given twice is an
    error: Hydra would silently take one of the two."""
    from aifactory_train.errors import ConfigError

    found: dict[str, Path] = {}
    for directory in config_dirs():
        for path in sorted((directory / "recipe").glob("*.yaml")):
            if path.stem in found:
                raise ConfigError(f"recipe '{path.stem}' is defined twice: {found[path.stem]} and {path}; rename "
                                  f"one (a copy: `aift recipes copy {path.stem} NEW_NAME --to DIR`)")
            found[path.stem] = path
    return found


def recipe_names() -> list[str]:
    return sorted(recipe_files())


def recipe_info(name: str) -> RecipeInfo:
    from omegaconf import OmegaConf

    from aifactory_train.errors import ConfigError

    files = recipe_files()
    if name not in files:
        raise ConfigError(f"unknown recipe '{name}'; valid recipes: {', '.join(sorted(files))}")
    path = files[name]
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
        source="shipped" if path.parent.parent == config_dir() else str(path.parent.parent.parent),
    )


def model_configs_for_task(task: str) -> list[str]:
    """Names of the model configs (configs/model/*.yaml) whose ``task`` is ``task``."""
    from omegaconf import OmegaConf

    return sorted({p.stem for d in config_dirs() for p in (d / "model").glob("*.yaml")
                   if OmegaConf.load(p).get("task") == task})


def load_object(spec: str):
    """Import ``"package.module:attribute"``."""
    module_name, _, attribute = spec.partition(":")
    return getattr(importlib.import_module(module_name), attribute)
