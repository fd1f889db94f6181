"""`aift recipes copy SOURCE NAME --to DIR`: a recipe, copied and renamed into a folder of your own, to adapt for
a use case (the expertise centre's way of starting a company's recipe), as torchtune's ``tune cp`` does.

A recipe is one folder (its code and its ``configs/``), and its code imports only ``aifactory_train.recipe`` and
its own files (relative imports), so the copy is the folder, with the recipe's names renamed: the package path in
the configs' ``_target_``s (``aifactory_train.recipes.fruit_sorting...`` -> ``tulip_grading...``), the class
prefixes (``FruitSorting...`` -> ``TulipGrading...``) and the config names. No import line is rewritten.
``AIFT_RECIPES_PATH=DIR`` then makes every ``aift`` command find it. Nothing that exists is overwritten.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

from aifactory_train.errors import ConfigError

NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]*")


def camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _check_name(name: str, known: list[str]) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"recipe name '{name}' is not valid: use lower-case letters, digits and '_', starting with a "
                          f"letter (it becomes a Python package and config name), e.g. tulip_grading")
    if name in known:
        raise ConfigError(f"recipe name '{name}' is taken (recipes: {', '.join(known)}); choose another")
    if importlib.util.find_spec(name) is not None:
        # the copy's folder goes first on sys.path, so it would hide that module from everything else
        raise ConfigError(f"recipe name '{name}' is the name of an importable Python module; choose another, "
                          f"e.g. {name}_recipe")


def copy_recipe(source: str, name: str, to: str | Path) -> list[Path]:
    """Copy recipe ``source`` as ``name`` into ``to``; return the files written."""
    from aifactory_train.locations import recipe_folders, recipe_info, recipe_package

    folders = recipe_folders()
    recipe_info(source)  # an unknown source lists the valid ones
    _check_name(name, sorted(folders))
    to = Path(to).expanduser().resolve()
    renames = {recipe_package(source): name, camel(source): camel(name), source: name}
    # one pass, longest first: a new name that contains the old one (weed_maps -> my_weed_maps) must not
    # be renamed again
    pattern = re.compile("|".join(re.escape(old) for old in sorted(renames, key=len, reverse=True)))

    def renamed(text: str) -> str:
        return pattern.sub(lambda match: renames[match.group(0)], text)

    source_dir = folders[source]
    plan = [(path, to / name / Path(*map(renamed, path.relative_to(source_dir).parts)))
            for path in sorted(source_dir.rglob("*"))
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo")]
    existing = [str(target) for _, target in plan if target.exists()]
    if (to / name).exists():
        existing.insert(0, str(to / name))
    if existing:
        raise ConfigError(f"--to {to}: would overwrite {', '.join(existing[:3])}"
                          f"{' and more' if len(existing) > 3 else ''}; choose another name or folder")
    written = []
    for origin, target in plan:
        target.parent.mkdir(parents=True, exist_ok=True)
        if origin.suffix in (".py", ".yaml", ".yml", ".md", ".txt", ".json", ".sh"):
            target.write_text(renamed(origin.read_text()))
        else:
            shutil.copy2(origin, target)
        written.append(target)
    return written
