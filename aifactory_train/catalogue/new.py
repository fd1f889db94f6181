"""`aift recipes new NAME --task TASK --to DIR`: a minimal working recipe for a task, from a small template, to grow
into a use case (where `aift recipes copy` starts from a full shipped recipe).

A task is a folder ``templates/<task>/``, laid out as the recipe it writes (see aifactory_train/recipe.py); every
file ends in ``.tmpl`` (so no tool takes a template for code) and ``{{name}}``/``{{Camel}}`` in its text and path
are replaced by the recipe's name and its CamelCase form. Adding a task is adding such a folder. Nothing that exists
is overwritten.
"""

from __future__ import annotations

from pathlib import Path

from aifactory_train.catalogue.copy import _check_name, camel
from aifactory_train.errors import ConfigError

TEMPLATES = Path(__file__).resolve().parent / "templates"
SUFFIX = ".tmpl"


def tasks() -> list[str]:
    """The tasks with a template: one folder each."""
    return sorted(p.name for p in TEMPLATES.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def _fill(text: str, name: str) -> str:
    return text.replace("{{name}}", name).replace("{{Camel}}", camel(name))


def new_recipe(name: str, task: str, to: str | Path) -> list[Path]:
    """Write recipe ``name`` for ``task`` into ``to``/``name``/; return the files written."""
    from aifactory_train.locations import recipe_folders

    if task not in tasks():
        raise ConfigError(f"--task '{task}' has no template; valid tasks: {', '.join(tasks())}")
    _check_name(name, sorted(recipe_folders()))
    to = Path(to).expanduser().resolve()
    source = TEMPLATES / task
    plan = [(path, to / name / _fill(str(path.relative_to(source)), name).removesuffix(SUFFIX))
            for path in sorted(source.rglob(f"*{SUFFIX}"))]
    if (to / name).exists():
        raise ConfigError(f"--to {to}: would overwrite {to / name}; choose another name or folder")
    written = []
    for template, target in plan:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(_fill(template.read_text(), name))
        written.append(target)
    return written
