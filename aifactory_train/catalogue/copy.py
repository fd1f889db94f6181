"""`aift recipes copy SOURCE NAME --to DIR`: a recipe, copied and renamed into a folder of your own, to adapt for
a use case (the expertise centre's way of starting a company's recipe), as torchtune's ``tune cp`` does.

The copy gets the recipe's package (``DIR/NAME/``), its recipe, data and experiment configs
(``DIR/configs/...``), with the package path, the class names (``PlasticSorting...`` -> ``TulipGrading...``)
and the config names renamed, so every ``_target_`` points at the copy's code, never at the original's.
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


def _source_package(schema: str) -> tuple[str, Path]:
    """The recipe's Python package (dotted) and its folder, from its schema ("pkg.config:Class")."""
    package = schema.partition(":")[0].rpartition(".")[0]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"recipe.schema '{schema}': its package '{package}' cannot be found to copy")
    return package, Path(list(spec.submodule_search_locations)[0])


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


def _data_and_experiments(recipe_file: Path, source: str) -> list[tuple[Path, str]]:
    """(config file, group) of the source's data config and of the experiments built on it."""
    configs = recipe_file.parent.parent
    found = []
    data = configs / "data" / f"{source}.yaml"
    if data.is_file():
        found.append((data, "data"))
    for experiment in sorted((configs / "experiment").glob("*.yaml")):
        if re.search(rf"override /recipe:\s*{re.escape(source)}\s*$", experiment.read_text(), re.MULTILINE):
            found.append((experiment, "experiment"))
    return found


def copy_recipe(source: str, name: str, to: str | Path) -> list[Path]:
    """Copy recipe ``source`` as ``name`` into ``to``; return the files written."""
    from aifactory_train.locations import recipe_files, recipe_info

    files = recipe_files()
    info = recipe_info(source)  # an unknown source lists the valid ones
    _check_name(name, sorted(files))
    package, package_dir = _source_package(info.schema)
    to = Path(to).expanduser().resolve()
    renames = {package: name, camel(source): camel(name), source: name}
    # one pass, longest first: a new name that contains the old one (crop_detection -> my_crop_detection) must not
    # be renamed again
    pattern = re.compile("|".join(re.escape(old) for old in sorted(renames, key=len, reverse=True)))

    def renamed(text: str) -> str:
        return pattern.sub(lambda match: renames[match.group(0)], text)

    plan: list[tuple[Path, Path]] = []  # (from, to) of every file
    for path in sorted(package_dir.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo"):
            plan.append((path, to / name / path.relative_to(package_dir)))
    plan.append((files[source], to / "configs" / "recipe" / f"{name}.yaml"))
    for path, group in _data_and_experiments(files[source], source):
        plan.append((path, to / "configs" / group / renamed(path.name)))
    existing = [str(target) for _, target in plan if target.exists()]
    if (to / name).exists():
        existing.insert(0, str(to / name))
    if existing:
        raise ConfigError(f"--to {to}: would overwrite {', '.join(existing[:3])}"
                          f"{' and more' if len(existing) > 3 else ''}; choose another name or folder")
    written = []
    for origin, target in plan:
        target.parent.mkdir(parents=True, exist_ok=True)
        if origin.suffix in (".py", ".yaml", ".yml", ".md", ".txt", ".json"):
            target.write_text(renamed(origin.read_text()))
        else:
            shutil.copy2(origin, target)
        written.append(target)
    return written
