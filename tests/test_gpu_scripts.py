"""The GPU scripts (benchmarks/gpu/*.sh) stay runnable while no GPU is lent.

A session gets a GPU for 15 minutes, by chance; a script whose flag was renamed, whose model config is gone or
whose `aift train` override no longer validates would spend that time failing. Every command in them is checked
here as far as a CPU can: the shell syntax (`bash -n`), each benchmark script's arguments with that script's own
parser, each `aift` line with the CLI's parser, each `aift train` line composed and validated like the README's
examples, and each `aift bench` profile loaded. What they measure runs on CPU in test_bench.py."""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from aifactory_train.records.config import validate
from aifactory_train.locations import config_dir
from test_config import compose_run

ROOT = Path(__file__).resolve().parents[1]
# the framework's (acceptance, prepare) and each recipe's own checks, beside its code (recipes/<name>/gpu*.sh)
SCRIPTS = sorted([*(ROOT / "benchmarks" / "gpu").glob("*.sh"), *(ROOT / "recipes").glob("*/gpu*.sh")])
CONFIGS = config_dir()


def script_commands(script: Path) -> list[list[str]]:
    """The python3 commands of a script: continuation lines joined, `timeout N` dropped, pipes and redirections
    cut off, ${VAR:-default} read as its default, a `for VAR in A B` loop's $VAR as A, and $REPO as this checkout."""
    text = script.read_text().replace("\\\n", " ")
    commands = []
    loop_values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if loop := re.match(r"for (\w+) in (\S+)", line):
            loop_values[loop.group(1)] = loop.group(2)
        for name, value in loop_values.items():
            line = re.sub(rf"\${name}\b|\${{{name}}}", value, line)
        line = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", line).replace("$REPO", str(ROOT))
        line = re.sub(r"\s\d*>>?(&\d+|\s*\"[^\"]*\"|\s*\S+)", " ", line)  # redirections: 2>&1, > "$OUT/x"
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        words: list[str] = []
        for token in [*lexer, ";"]:
            if token not in (";", "&&", "||", "|"):
                words.append(token)
                continue
            if words[:1] == ["timeout"]:
                words = words[2:]
            if words[:1] == ["python3"]:
                commands.append(words[1:])
            words = []
    return commands


COMMANDS = [(str(script.relative_to(ROOT)), command) for script in SCRIPTS for command in script_commands(script)]


def test_every_gpu_script_is_valid_bash_and_has_commands():
    assert {str(s.relative_to(ROOT)) for s in SCRIPTS} >= {
        "benchmarks/gpu/acceptance.sh", "benchmarks/gpu/prepare.sh", "recipes/crop_detection/gpu.sh",
        "recipes/plastic_sorting/gpu.sh", "recipes/clinical_notes/gpu.sh", "recipes/clinical_notes/gpu_strategies.sh"}
    for script in SCRIPTS:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, (script.name, result.stderr)
    checked = [c for _, c in COMMANDS if c[0] not in ("-c",) and c[:2] != ["-m", "pip"]]
    assert len(checked) >= 12  # the parsing above found them (a change of layout would make this list empty)


def benchmark_module(path: str):
    name = Path(path).stem
    return importlib.import_module(f"aifactory_train.benchmarks.{name}")


@pytest.mark.parametrize("script, args", [c for c in COMMANDS if c[1][0].endswith(".py")],
                         ids=lambda v: v if isinstance(v, str) else " ".join(v)[:80])
def test_every_benchmark_command_parses_with_its_scripts_parser(script, args):
    assert (ROOT / args[0]).is_file() or Path(args[0]).is_file(), args[0]
    module = benchmark_module(args[0])
    parsed = module.build_parser().parse_args(args[1:])  # an unknown flag or a bad choice exits here
    model = getattr(parsed, "model", None)
    if model is not None:  # a model config of that recipe's task
        from omegaconf import OmegaConf

        from aifactory_train.locations import recipe_files

        task = OmegaConf.load(recipe_files()[parsed.recipe]).recipe.task
        assert OmegaConf.load(CONFIGS / "model" / f"{model}.yaml").task == task, model


AIFT = [(s, c[2:]) for s, c in COMMANDS if c[:2] == ["-m", "aifactory_train.commands.cli"]]


@pytest.mark.parametrize("script, args", AIFT, ids=lambda v: v if isinstance(v, str) else " ".join(v)[:80])
def test_every_aift_command_parses_and_its_config_validates(script, args, tmp_path):
    from aifactory_train.commands.cli import _parser

    if args[0] in ("train", "eval", "export", "predict"):
        cfg = compose_run([a for a in args[1:] if not a.startswith("hydra.")], tmp_path,
                          root="train" if args[0] == "train" else args[0])
        validate(cfg)  # every override exists and has a valid value (the data are written by the script itself)
        return
    parsed = _parser().parse_args(args)
    assert parsed.command == args[0]
    if args[0] == "bench":
        from aifactory_train.bench.suites import load_profile

        assert load_profile(parsed.profile)["name"]


def test_the_aift_commands_were_found():
    assert {a[0] for _, a in AIFT} >= {"train", "data", "bench", "predict"}


def test_every_module_they_run_exists_and_every_inline_program_compiles():
    import importlib.util

    for script, args in COMMANDS:
        if args[0] == "-m":
            assert importlib.util.find_spec(args[1]) is not None, (script, args[1])
        elif args[0] == "-c":
            compile(args[1], f"{script}: python3 -c", "exec")
