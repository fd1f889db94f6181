"""`aift recipes show NAME`: what a recipe does and how to run it, read from its own files (shipped or copied).

Everything shown comes from the recipe's folder (its recipe and data configs, its experiments, its module class) and
from the benchmark results of this checkout (``benchmarks/results/*.json``), so a copy or a new recipe shows its own.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

WIDTH = 100
_TOP_KEY = re.compile(r"^([A-Za-z_][\w]*):(?:[^#]*?)(?:\s+#\s*(.*))?$")
_DATE = re.compile(r"(\d{4}-\d{2}-\d{2})")


def _header_comments(path: Path) -> list[str]:
    """The comment lines a config file starts with (its description), without the ``#``."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if not text.startswith("@package"):
            lines.append(text)
    return lines


def _key_comments(path: Path) -> dict[str, str]:
    """Top-level key -> the comment at the end of its line (what it means, its valid values)."""
    return {m.group(1): m.group(2) or "" for m in map(_TOP_KEY.match, path.read_text().splitlines()) if m}


def _value(node: Any) -> str:
    if isinstance(node, (dict, list)):
        return json.dumps(node)
    if isinstance(node, bool):
        return str(node).lower()
    return "null" if node is None else str(node)


def _options(section: Any, comments: dict[str, str], skip: tuple[str, ...] = ("_target_",)) -> list[str]:
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(section, resolve=False)  # ${paths.data_dir} shown as written
    rows = [(key, _value(value), comments.get(key, "")) for key, value in plain.items() if key not in skip]
    width = min(max((len(f"{k}={v}") for k, v, _ in rows), default=0), 32)  # a long value pushes only its comment
    return [f"  {(k + '=' + v).ljust(width)}  {c}".rstrip() if c else f"  {k}={v}" for k, v, c in rows]


def _section(raw: Any, key: str) -> Any:
    return raw.get(key) if raw is not None and key in raw else None


def clusters() -> list[str]:
    from aifactory_train.locations import config_dir

    return sorted(p.stem for p in (config_dir() / "cluster").glob("*.yaml"))


def export_formats(target: str) -> str:
    """The module class's EXPORT_FORMATS (importing the recipe's module: torch, a few seconds)."""
    from hydra.utils import get_class

    try:
        module_class = get_class(target)
    except Exception as err:  # noqa: BLE001 - the recipe's own import error, shown rather than raised
        return f"(cannot import {target}: {str(err).splitlines()[0] if str(err) else type(err).__name__})"
    formats = getattr(module_class, "EXPORT_FORMATS", ())
    return ", ".join(f"format={f}" for f in formats) if formats else "none (the module has no EXPORT_FORMATS)"


def results_dir() -> Path | None:
    """``benchmarks/results`` of this checkout (or install), if there is one."""
    import importlib.util

    spec = importlib.util.find_spec("aifactory_train.benchmarks")
    for base in ([Path(p) for p in spec.submodule_search_locations] if spec else []):
        if (base / "results").is_dir():
            return base / "results"
    from aifactory_train.locations import config_dir

    checkout = config_dir().parent / "benchmarks" / "results"
    return checkout if checkout.is_dir() else None


def _figure(result: dict) -> str:
    """The headline number of a result file, whatever benchmark wrote it."""
    context = ", ".join(f"{k} {result[k]}" for k in ("model", "batch_size", "precision", "hardware") if result.get(k))
    steps = result.get("step")
    if isinstance(steps, list) and steps and isinstance(steps[0], dict) and "recipe_samples_per_s" in steps[0]:
        step = steps[0]
        plain = step.get("plain_samples_per_s")
        versus = f" (plain PyTorch loop: {plain:.1f})" if isinstance(plain, (int, float)) else ""
        return f"{step['recipe_samples_per_s']:.1f} training samples/s{versus}; {context}"
    if isinstance(result.get("metrics"), dict) and result.get("monitor"):
        return f"{result['monitor']} = {result.get('best_score')} after {result.get('global_step')} steps; {context}"
    runs = result.get("runs")
    if isinstance(runs, list) and runs and isinstance(runs[-1], dict):
        run = runs[-1]
        metrics = run.get("metrics") or {}
        main = {k: v for k, v in metrics.items() if k.startswith("test/")}
        shown = ", ".join(f"{k} {v}" for k, v in list(main.items())[:3])
        return f"{run.get('train_samples_per_s', '?')} training samples/s; {shown}".rstrip("; ")
    return "(see the file)"


def latest_benchmark(name: str, folder: Path | None = None) -> tuple[Path, dict] | None:
    """The newest result file naming recipe ``name`` (its ``recipe`` field, or a file name starting with it), by the
    date it states (its ``date`` field, else the date in its name)."""
    folder = folder if folder is not None else results_dir()
    if folder is None:
        return None
    found = []
    for path in sorted(folder.glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(result, dict):
            continue
        if result.get("recipe") == name or path.name == f"{name}.json" or path.name.startswith(f"{name}_"):
            match = _DATE.search(path.name)
            date = str(result.get("date") or (match.group(1) if match else ""))
            found.append((date, path.name, path, result))
    if not found:
        return None
    _, _, path, result = max(found, key=lambda row: (row[0], row[1]))
    return path, result


def _block_comments(text: str, key: str) -> dict[str, str]:
    """The end-of-line comments of the keys of the top-level block ``key:`` of a YAML text, by key."""
    block = text[text.index(f"\n{key}:") + 1:] if f"\n{key}:" in text else ""
    comments = {}
    for line in block.splitlines()[1:]:
        if line and not line[0].isspace():
            break  # the next top-level block
        match = re.match(r"^\s+(\w+):[^#]*?(?:\s+#\s*(.*))?$", line)
        if match:
            comments[match.group(1)] = match.group(2) or ""
    return comments


def show_recipe(name: str) -> str:
    import textwrap

    from omegaconf import OmegaConf

    from aifactory_train.locations import recipe_info

    info = recipe_info(name)  # an unknown name lists the valid ones
    folder = Path(info.folder)
    recipe_file = folder / "configs" / "recipe" / f"{name}.yaml"
    data_file = folder / "configs" / "data" / f"{name}.yaml"
    raw = OmegaConf.load(recipe_file)
    out = [f"{name}: {info.task}", *textwrap.wrap(info.description, WIDTH, initial_indent="  ", subsequent_indent="  "),
           f"  folder: {folder}" + ("" if info.source == "shipped" else f"  (from $AIFT_RECIPES_PATH {info.source})"),
           f"  default model: {info.default_model}" if info.default_model != "?" else
           f"  model: {_value(_section(raw, 'model').get('name')) if _section(raw, 'model') else '?'}"]

    out += ["", "Data", *textwrap.wrap(info.data_format, WIDTH, initial_indent="  format: ", subsequent_indent="    ")]
    if data_file.is_file():
        out += [f"  {line}" for line in _header_comments(data_file) if not line.lower().startswith("make demo data")]
    out += ["", "Demo data", f"  aift data synth {name} --out data/{name}",
            f"  aift train recipe={name} data.root=data/{name} debug=smoke"]

    cluster_names = "|".join(clusters())
    out += ["", f"Experiments (launch: cluster={cluster_names}; aift train ... to run here)",
            f"  default: aift launch recipe={name} cluster=CLUSTER data.root=DIR"]
    for path in sorted((folder / "configs" / "experiment").glob("*.yaml")):
        about = next((line for line in _header_comments(path) if line and not line.lower().startswith(
            ("run:", "data:"))), "")
        out.append(f"  {path.stem}: aift launch recipe={name} experiment={path.stem} cluster=CLUSTER data.root=DIR")
        if about:
            out += textwrap.wrap(about, WIDTH, initial_indent="      ", subsequent_indent="      ")

    out += ["", f"Key options (defaults; override as key=value, e.g. data.batch_size=64)"]
    if data_file.is_file():
        out += ["  data:", *("  " + line for line in _options(OmegaConf.load(data_file), _key_comments(data_file)))]
    text = recipe_file.read_text()
    # the optimizer, and the recipe's own options of `aift predict` and `aift export` (its schema's subclasses of
    # PredictOptions/ExportOptions), as its recipe config sets them
    for key in ("optim", "predict", "export"):
        section = _section(raw, key)
        if section is not None:
            out += [f"  {key}:", *("  " + line for line in _options(section, _block_comments(text, key), skip=()))]

    out += ["", "Export", f"  {export_formats(info.schema and str(raw.recipe.module._target_))}"]
    if "format=" in out[-1]:
        out.append(f"  aift export recipe={name} ckpt_path=RUN/checkpoints/last.ckpt {out[-1].split(',')[0].strip()}")

    latest = latest_benchmark(name)
    out += ["", "Latest benchmark"]
    if latest is None:
        out.append("  none in benchmarks/results/ (aift bench recipes measures one)")
    else:
        path, result = latest
        out += [f"  {path.name}" + (f" ({result['date']})" if result.get("date") else ""),
                *textwrap.wrap(_figure(result), WIDTH, initial_indent="  ", subsequent_indent="  ")]
        if result.get("command"):
            out += textwrap.wrap(f"measured with: {result['command']}", WIDTH, initial_indent="  ",
                                 subsequent_indent="    ")
    return "\n".join(out)
