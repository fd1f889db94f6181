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


SHIPPED_PACKAGE = "aifactory_train.recipes"


def shipped_recipes_root() -> Path:
    """The folder of the shipped recipes: ``recipes/`` in a checkout, inside the package when installed. It is laid
    out as any folder of ``$AIFT_RECIPES_PATH``: one folder per recipe, its configs beside its code."""
    import importlib.util

    spec = importlib.util.find_spec(SHIPPED_PACKAGE)
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def _recipe_folders(root: Path) -> list[Path]:
    return sorted(folder for folder in root.iterdir()
                  if (folder / "configs" / "recipe" / f"{folder.name}.yaml").is_file())


def user_recipe_roots() -> list[Path]:
    """The recipe folders named by ``$AIFT_RECIPES_PATH``. Each holds recipes ``<name>/``: the recipe's Python
    package with its configs in ``<name>/configs/{recipe,data,experiment}/``."""
    from aifactory_train.errors import ConfigError

    roots = []
    for entry in filter(None, os.environ.get(RECIPES_PATH_ENV, "").split(os.pathsep)):
        root = Path(entry).expanduser().resolve()
        if not root.is_dir() or not _recipe_folders(root):
            raise ConfigError(f"${RECIPES_PATH_ENV}: '{entry}' is not a recipes folder: expected "
                              f"{root}/<name>/configs/recipe/<name>.yaml in the recipe's package {root}/<name>/, as "
                              f"`aift recipes copy SOURCE NAME --to {entry}` and `aift recipes new NAME --to {entry}` "
                              f"write")
        roots.append(root)
    return roots


def recipe_roots() -> list[tuple[Path, str]]:
    """(folder, import prefix) of every recipes folder: the shipped one (``aifactory_train.recipes.<name>``), then
    those of ``$AIFT_RECIPES_PATH`` (importable as ``<name>``). Every command discovers, searches, copies and lists
    recipes through these, in the same way."""
    return [(shipped_recipes_root(), SHIPPED_PACKAGE + "."), *((root, "") for root in user_recipe_roots())]


def recipe_folders() -> dict[str, Path]:
    """Recipe name -> its folder. A name given twice is an error: Hydra would silently take one of the two."""
    from aifactory_train.errors import ConfigError

    found: dict[str, Path] = {}
    for root, _ in recipe_roots():
        for folder in _recipe_folders(root):
            if folder.name in found:
                raise ConfigError(f"recipe '{folder.name}' is defined twice: {found[folder.name]} and {folder}; "
                                  f"rename one (a copy: `aift recipes copy {folder.name} NEW_NAME --to DIR`)")
            found[folder.name] = folder
    return found


def recipe_package(name: str) -> str:
    """The import name of a recipe's package."""
    folder = recipe_folders()[name]
    return (SHIPPED_PACKAGE + "." if folder.parent == shipped_recipes_root() else "") + name


def default_recipe() -> str:
    """The recipe ``aift train`` runs when none is named: the ``recipe`` entry of configs/train.yaml's defaults."""
    from omegaconf import OmegaConf

    for entry in OmegaConf.load(config_dir() / "train.yaml").get("defaults", []):
        if not isinstance(entry, str) and "recipe" in entry:
            return str(entry["recipe"])
    raise LookupError(f"{config_dir() / 'train.yaml'}: no recipe in its defaults")


def config_dirs() -> list[Path]:
    """Every Hydra config tree: the shared groups (``configs/``), then each recipe's ``configs/``."""
    return [config_dir(), *(folder / "configs" for folder in recipe_folders().values())]


def use_recipes() -> list[str]:
    """Make every recipe usable in this process: the packages of ``$AIFT_RECIPES_PATH`` importable, and each
    recipe's ``configs/`` on Hydra's search path, through a search-path plugin (Hydra's own mechanism, so every
    entry point sees the recipe groups: the apps, the compose API, ``--help``). Returns extra Hydra overrides
    (none today; kept so callers need not change when one is needed)."""
    roots = user_recipe_roots()
    for root in reversed(roots):
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
    recipe_folders()  # a recipe name given twice is an error here, before Hydra silently picks one
    from hydra.core.plugins import Plugins

    if not any(getattr(plugin, "aift_recipes", False) for plugin in Plugins.instance().discover()):
        Plugins.instance().register(_recipes_search_path_plugin())
    return []


def _recipes_search_path_plugin():
    from hydra.core.config_search_path import ConfigSearchPath
    from hydra.plugins.search_path_plugin import SearchPathPlugin

    class AiftRecipesSearchPath(SearchPathPlugin):
        aift_recipes = True

        def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
            for folder in recipe_folders().values():  # read when Hydra starts: also recipes added meanwhile
                search_path.append(provider="aift-recipe", path=f"file://{folder / 'configs'}")

    return AiftRecipesSearchPath


@dataclass(frozen=True)
class RecipeInfo:
    """What `aift recipes list` shows, read from ``<recipe>/configs/recipe/<name>.yaml`` without importing torch."""

    name: str
    task: str
    default_model: str
    data_format: str
    description: str
    synth: str  # "module:function" that writes a demo dataset
    schema: str  # "module:Class", the recipe's config schema
    deidentify: str = ""  # "module:function" of `aift data deidentify`, for recipes on sensitive text
    source: str = "shipped"  # "shipped", or the $AIFT_RECIPES_PATH folder it comes from
    folder: str = ""  # the recipe's folder: its code and configs


def recipe_files() -> dict[str, Path]:
    """Recipe name -> its recipe config file (``<folder>/configs/recipe/<name>.yaml``)."""
    return {name: folder / "configs" / "recipe" / f"{name}.yaml" for name, folder in recipe_folders().items()}


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
        source="shipped" if path.parents[3] == shipped_recipes_root() else str(path.parents[3]),
        folder=str(path.parents[2]),
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


def cache_dir() -> Path:
    """Where aift keeps what it can compute again (model name lists, the last failure's details, an audit log with
    no better place): $AIFT_CACHE_DIR, else $XDG_CACHE_HOME/aifactory_train, else ~/.cache/aifactory_train."""
    import os

    return Path(os.environ.get("AIFT_CACHE_DIR") or
                Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aifactory_train")
