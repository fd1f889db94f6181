"""The README's commands are true to the code: every `aift` line of its shell examples parses, and every config it
composes (train, eval, export, launch) passes validation. A renamed key, group or option fails here, not a user."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from aifactory_train.records.config import validate
from aifactory_train.errors import ConfigError
from test_config import compose_run

README = Path(__file__).resolve().parents[1] / "README.md"
HYDRA_COMMANDS = ("train", "eval", "predict", "export")


def readme_commands() -> list[list[str]]:
    """The `aift ...` commands of the README's ```bash blocks, without their comments, as argument lists."""
    commands, in_bash = [], False
    for line in README.read_text().replace("\\\n", " ").splitlines():  # a command continued with \ is one line
        if line.startswith("```"):
            in_bash = line.strip() == "```bash"
            continue
        if in_bash and line.startswith("aift "):
            commands.append(shlex.split(line.split("  #")[0].split(" # ")[0])[1:])
    return commands


COMMANDS = readme_commands()


def test_the_readme_has_examples_of_every_command():
    assert len(COMMANDS) > 30
    assert {c[0] for c in COMMANDS} >= {"train", "eval", "predict", "export", "launch", "recipes", "data", "checkpoint",
                                        "bench"}


def as_overrides(args: list[str]) -> tuple[str, list[str]]:
    """The config root and Hydra overrides a command composes: a sweep's first point; launch's options dropped."""
    command, rest = args[0], args[1:]
    if command == "launch":
        rest = [a for i, a in enumerate(rest)
                if not a.startswith("--") and not (i > 0 and rest[i - 1] == "--local")]
        command = "train"
    overrides = [re.sub(r"^(model)=([^,]+),.*$", r"\1=\2", a).replace("<run>", "RUN")  # a placeholder for users
                 for a in rest if a not in ("-m", "--cfg", "job")]
    return command, overrides


# the README's copied and new recipes (tulip_grading, seed_counting) exist only after `aift recipes copy|new`:
# tests/test_recipe_copy.py and tests/test_recipe_new.py train such recipes
WRITTEN_RECIPES = ("recipe=tulip_grading", "recipe=seed_counting")


@pytest.mark.parametrize("args", [c for c in COMMANDS if c[0] in (*HYDRA_COMMANDS, "launch")
                                  and not set(WRITTEN_RECIPES) & set(c)], ids=lambda a: " ".join(a)[:90])
def test_every_readme_config_composes_and_validates(args, tmp_path):
    root, overrides = as_overrides(args)
    try:
        validate(compose_run(overrides, tmp_path, root=root))
    except ConfigError as err:
        # the README's example paths (/models/..., /data/...) are not on this machine: refused as missing, which is
        # the check working; any other refusal is a README that no longer matches the code
        placeholders = [o.split("=", 1)[1] for o in overrides if re.match(r"^[\w.]+=/(models|data)/", o)]
        assert any(p in str(err) for p in placeholders) and "exist" in str(err), str(err)


@pytest.mark.parametrize("args", [c for c in COMMANDS if c[0] not in (*HYDRA_COMMANDS,)],
                         ids=lambda a: " ".join(a)[:90])
def test_every_other_readme_command_parses(args):
    from aifactory_train.commands.cli import _parser

    parsed = _parser().parse_args(args)  # an unknown subcommand or option exits here
    assert parsed.command == args[0]
