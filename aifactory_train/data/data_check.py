"""`aift data check`: read a recipe's data as training would, and report its health without training.

What it reports, per split: counts, class balance, image and box sizes, text lengths (numbers only, never text),
the records the readers left out or could not read (by reason, with the first paths), duplicates within the split,
and leakage: the same content in two splits. Also the data card and whether the owner's usage terms allow this use
(user, recipe, host, Slurm account). It writes ``data_check.json`` (stable keys, ``schema_version``),
``data_check.md`` and pictures (class histogram, box sizes, text lengths, a contact sheet of labelled samples).

Exit status: 0 healthy (warnings allowed); 1 when it found what training would refuse (unreadable data, terms that
do not allow this use) or content shared between splits; 2 (the CLI's) for a bad config or command line.

Recipe-agnostic: the framework only uses what every DataModule has (``setup``, ``lineage()``, ``data_info``) and,
when a recipe provides one, the function ``describe(datamodule, cheap)`` of the module ``check`` beside the
DataModule's module (``<recipe package>.check``), which returns a :class:`DataDescription`. Without it a generic
description comes from ``datamodule.splits`` (``datasets.Dataset`` per split with a path and a label column) or,
failing that, from the lineage's row counts. Readers may expose ``invalid_records`` (reason -> count, paths, or
``{"count", "examples" | "first_paths"}``, as lineage.InvalidRecords keeps them; optionally per split), which is
reported as is.

Leakage between file-based splits uses the SHA-256 of every file that the recipe's own digest computed
(``DigestCache.file_digests``, remembered in this process): no file is read a second time. Records that are not
files of their own (a JSONL line) carry a content hash from the recipe's ``describe``.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib
import json
import logging
import posixpath
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from aifactory_train.errors import AiftError, DataError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
REPORT_JSON = "data_check.json"
REPORT_MD = "data_check.md"
EXAMPLES = 5  # paths listed per finding; the counts are always complete
SHEET_PER_SPLIT = 8  # samples per split on the contact sheet


@dataclass
class Sample:
    """One example as the contact sheet shows it: an RGB uint8 tensor (3, H, W), a caption, and its boxes."""

    image: Any
    caption: str
    boxes: list[list[float]] = field(default_factory=list)  # xyxy pixels
    box_labels: list[str] = field(default_factory=list)


@dataclass
class SplitDescription:
    """What a recipe tells about one split. Every list is per example unless said otherwise; None: not known."""

    count: int
    files: list[str] | None = None  # each example's file, relative to the data root (duplicates, leakage)
    record_ids: list[str] | None = None  # where an example is when it is no file of its own ("train.jsonl line 3")
    record_hashes: list[str] | None = None  # ... and the SHA-256 of its content (duplicates, leakage)
    labels: list[list[str]] | None = None  # each example's class names: one (classification) or one per box
    image_sizes: list[tuple[int, int]] | None = None  # (width, height) of all or a sample of the images
    boxes: list[tuple[str, float, float]] | None = None  # (class, width, height) of every box
    lengths: dict[str, list[int]] | None = None  # e.g. {"note_chars": [...]}: numbers only
    counters: dict[str, int] = field(default_factory=dict)  # e.g. notes truncated to data.max_length


@dataclass
class DataDescription:
    splits: dict[str, SplitDescription]
    class_names: list[str] | None = None
    label_unit: str = "example"  # what a class count counts: "example" (one label each) or "box"
    sample: Callable[[str, int], Sample] | None = None  # for the contact sheet
    no_samples_reason: str | None = None  # why there is no contact sheet (sensitive text, no images)
    invalid: dict[str, Any] = field(default_factory=dict)  # reason -> count / paths / {"count", "examples"}
    notes: list[str] = field(default_factory=list)  # lines for the report (how sizes were measured, ...)


# -- describing the data --------------------------------------------------------------------------------------
def recipe_describe(datamodule) -> Callable | None:
    """The recipe's ``check.describe``, found beside its DataModule's module, or None when it has none."""
    module = type(datamodule).__module__
    package = module.rpartition(".")[0]
    name = f"{package}.check" if package else "check"
    try:
        return getattr(importlib.import_module(name), "describe", None)
    except ModuleNotFoundError as err:
        if err.name == name:
            return None
        raise


def generic_description(datamodule, lineage) -> DataDescription:
    """Without a recipe hook: ``datamodule.splits`` of ``datasets.Dataset`` (a path-like and a label column), else
    the lineage's row counts."""
    splits = getattr(datamodule, "splits", None)
    described: dict[str, SplitDescription] = {}
    class_names = (getattr(datamodule, "data_info", None) or {}).get("class_names") if hasattr(datamodule, "data_info") else None
    if isinstance(splits, dict) and splits and all(hasattr(ds, "column_names") for ds in splits.values()):
        for name, ds in splits.items():
            path_column = next((c for c in ("path", "file", "file_name", "image_path") if c in ds.column_names), None)
            split = SplitDescription(count=len(ds), files=[str(p) for p in ds[path_column]] if path_column else None)
            if "label" in ds.column_names:
                feature = ds.features["label"]
                names = getattr(feature, "names", None)
                split.labels = [[names[v] if names else str(v)] for v in ds["label"]]
            described[name] = split
    else:
        described = {name: SplitDescription(count=s.num_rows) for name, s in lineage.splits.items()}
    return DataDescription(splits=described, class_names=class_names,
                           notes=["the recipe has no check.describe: counts, labels and files only"])


def _invalid_entries(raw: Any) -> dict[str, dict[str, Any]]:
    """reason -> {"count": n, "examples": [...]} from the shapes readers use (count, list of paths, a dict with
    count/examples/paths/first_paths, or any of them per split, which are summed)."""
    out: dict[str, dict[str, Any]] = {}

    def add(reason: str, count: int, examples: list) -> None:
        entry = out.setdefault(str(reason), {"count": 0, "examples": []})
        entry["count"] += int(count)
        entry["examples"] = (entry["examples"] + [str(e) for e in examples])[:EXAMPLES]

    if not isinstance(raw, dict):
        return out
    for reason, value in raw.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            add(reason, value, [])
        elif isinstance(value, (list, tuple, set)):
            add(reason, len(value), list(value)[:EXAMPLES])
        elif isinstance(value, dict) and ("count" in value or "examples" in value or "paths" in value):
            examples = list(value.get("examples") or value.get("paths") or value.get("first_paths") or [])
            add(reason, value.get("count", len(examples)), examples[:EXAMPLES])
        elif isinstance(value, dict):  # per split: {split: {reason: ...}}
            for inner, entry in _invalid_entries(value).items():
                add(inner, entry["count"], entry["examples"])
    return out


# -- statistics -------------------------------------------------------------------------------------------------
def _distribution(values) -> dict[str, Any] | None:
    import numpy as np

    if not values:
        return None
    array = np.asarray(values, dtype=float)
    q = np.percentile(array, [5, 50, 95])
    r = lambda v: round(float(v), 3)  # noqa: E731 - a report, not a measurement: 3 decimals read better
    return {"n": int(array.size), "min": r(array.min()), "p5": r(q[0]), "median": r(q[1]), "p95": r(q[2]),
            "max": r(array.max()), "mean": r(array.mean())}


def _classes(split: SplitDescription, class_names: list[str] | None) -> dict[str, Any] | None:
    if split.labels is None:
        return None
    counts = Counter(label for labels in split.labels for label in labels)
    names = list(class_names or sorted(counts))
    per_class = {name: counts.get(name, 0) for name in names}
    present = [n for n in per_class.values() if n]
    return {"counts": per_class, "missing": [n for n, c in per_class.items() if c == 0],
            "imbalance": round(max(present) / min(present), 3) if present else None,
            "unlabelled_examples": sum(1 for labels in split.labels if not labels)}


def _image_sizes(split: SplitDescription) -> dict[str, Any] | None:
    if not split.image_sizes:
        return None
    common = Counter(f"{w}x{h}" for w, h in split.image_sizes).most_common(10)
    return {"measured": len(split.image_sizes), "width": _distribution([w for w, _ in split.image_sizes]),
            "height": _distribution([h for _, h in split.image_sizes]), "most_common": dict(common)}


def _boxes(split: SplitDescription) -> dict[str, Any] | None:
    if split.boxes is None:
        return None
    sides = [(w * h) ** 0.5 for _, w, h in split.boxes]
    per_image = [len(labels) for labels in split.labels] if split.labels is not None else []
    return {"count": len(split.boxes), "sqrt_area_px": _distribution(sides),
            "width_px": _distribution([w for _, w, _ in split.boxes]),
            "height_px": _distribution([h for _, _, h in split.boxes]),
            "per_image": _distribution(per_image), "images_without_boxes": sum(1 for n in per_image if n == 0),
            "smaller_than_8px": sum(1 for s in sides if s < 8)}


def file_hashes(root: Path, files: list[str]) -> dict[str, str]:
    """SHA-256 of each file (relative to ``root``), as the digest computed it: from this process's memory of the
    digest's hashes, else the user's digest cache; a file neither holds is hashed once."""
    from aifactory_train.records.lineage import DigestCache

    unique = {posixpath.normpath(f): root / posixpath.normpath(f) for f in files}
    return DigestCache.for_root(root.resolve()).file_digests(unique)


def _content_keys(root: Path, split: SplitDescription) -> list[tuple[str, str]] | None:
    """(where, content hash) per example of a split, for duplicates and leakage; None: not known."""
    if split.record_hashes is not None:
        ids = split.record_ids or [f"record {i + 1}" for i in range(len(split.record_hashes))]
        return list(zip(ids, split.record_hashes))
    if split.files is not None:
        hashes = file_hashes(root, split.files)
        return [(f, hashes[posixpath.normpath(f)]) for f in split.files]
    return None


def duplicates_and_leakage(root: Path, splits: dict[str, SplitDescription]):
    keys = {name: _content_keys(root, split) for name, split in splits.items()}
    duplicates = {}
    for name, pairs in keys.items():
        if pairs is None:
            duplicates[name] = None
            continue
        groups = defaultdict(list)
        for where, digest in pairs:
            groups[digest].append(where)
        repeated = [places for places in groups.values() if len(places) > 1]
        duplicates[name] = {"groups": len(repeated), "extra_copies": sum(len(p) - 1 for p in repeated),
                            "examples": [places[:4] for places in repeated[:EXAMPLES]]}
    leakage, names = {}, [n for n in splits if keys[n] is not None]
    first_of = {n: {} for n in names}
    for n in names:
        for where, digest in keys[n]:
            first_of[n].setdefault(digest, where)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = [d for d in first_of[a] if d in first_of[b]]
            leakage[f"{a}/{b}"] = {"count": len(shared),
                                   "examples": [[first_of[a][d], first_of[b][d]] for d in shared[:EXAMPLES]]}
    checked = [n for n in splits if keys[n] is not None]
    return duplicates, leakage, checked


# -- the owner's terms ------------------------------------------------------------------------------------------
def usage_terms(resolved: dict[str, Any]) -> dict[str, Any]:
    """Whether this user, recipe, host and account may use the data, by the one check every command uses
    (aifactory_train.records.usage_terms): its record, plus ``allowed`` and the ``refusal``."""
    from aifactory_train.records.usage_terms import check_usage, data_paths, datacards_for, describe_cards, os_user

    paths = data_paths(resolved["data"])
    result = {"allowed": True, "refusal": None, "user": os_user(), "recipe": resolved["recipe"].get("name"),
              "terms": None}
    try:  # a card that cannot be read is a refusal in the report (exit 1), as training would refuse it
        cards = describe_cards(datacards_for(paths))
        result["terms"] = "; ".join(t for card in cards["cards"] for t in card["terms"]) or None
        result.update(check_usage(paths, resolved["recipe"], config=resolved))
    except DataError as err:
        result.update(allowed=False, refusal=str(err))
    return result


def _account(resolved: dict[str, Any]) -> str | None:
    from aifactory_train.records.tracks import job_account

    return job_account(resolved.get("cluster") or {})


# -- the check ------------------------------------------------------------------------------------------------
def _datamodule(resolved: dict[str, Any]):
    from aifactory_train.records.config import build

    return build(resolved["data"], _convert_="all")


def inspect(resolved: dict[str, Any], typed=None, cheap: bool = False) -> dict[str, Any]:
    """The report (without pictures) and, for the pictures, the description and the DataModule."""
    from aifactory_train.records.lineage import DigestCache, read_datacard

    started = time.time()
    recipe = resolved["recipe"]["name"]
    root = Path(resolved["data"]["root"])
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "recipe": recipe, "task": resolved["recipe"].get("task"),
        "data_root": str(root.resolve()), "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "duration_s": None, "status": None, "exit_code": None, "problems": [], "warnings": [], "notes": [],
        "datacard": {}, "usage_terms": None, "digest": None, "classes": None, "splits": {}, "invalid": {},
        "leakage": {}, "leakage_checked_splits": [], "pictures": {}, "contact_sheet": None,
    }
    problems, warnings = report["problems"], report["warnings"]
    state: dict[str, Any] = {"report": report, "description": None, "datamodule": None}

    def finish() -> dict[str, Any]:
        report["status"] = "problems" if problems else "healthy"
        report["exit_code"] = 1 if problems else 0
        report["duration_s"] = round(time.time() - started, 2)
        return state

    try:
        report["datacard"] = read_datacard(root) if root.is_dir() else {}
    except DataError as err:
        problems.append({"check": "datacard", "message": str(err)})
    report["usage_terms"] = terms = usage_terms(resolved)
    if not terms["allowed"]:
        problems.append({"check": "usage_terms", "message": terms["refusal"]})
        report["notes"].append("the owner's terms do not allow this use, so the data was not read")
        return finish()
    check_files = getattr(getattr(typed, "data", None), "check_files", None)
    previous, DigestCache.remembered = DigestCache.remembered, {}
    try:
        if check_files is not None:
            check_files("fit")
        datamodule = _datamodule(resolved)
        state["datamodule"] = datamodule
        datamodule.setup("fit")  # the same reading (and refusals) as a training run
        lineage = datamodule.lineage()
        describe = recipe_describe(datamodule)
        description = describe(datamodule, cheap) if describe else generic_description(datamodule, lineage)
        state["description"] = description
        report["digest"] = lineage.digest
        report["notes"] += description.notes
        report["classes"] = description.class_names
        duplicates, leakage, checked = duplicates_and_leakage(root, description.splits)
    except DataError as err:
        problems.append({"check": "read", "message": str(err)})
        report["notes"].append("the recipe's reader refused the data (as training would); the rest is not checked")
        return finish()
    finally:
        DigestCache.remembered = previous
    report["leakage"], report["leakage_checked_splits"] = leakage, checked
    invalid_raw = getattr(datamodule, "invalid_records", None)
    if invalid_raw is None and lineage.skipped_files:
        invalid_raw = {"unreadable (left out)": list(lineage.skipped_files)}
    invalid = _invalid_entries(invalid_raw)
    for reason, entry in _invalid_entries(description.invalid).items():
        invalid.setdefault(reason, entry)
    report["invalid"] = invalid
    for name, split in description.splits.items():
        lineage_split = lineage.splits.get(name)
        report["splits"][name] = {
            "count": split.count, "digest": lineage_split.digest if lineage_split else None,
            "classes": _classes(split, description.class_names), "image_sizes": _image_sizes(split),
            "boxes": _boxes(split), "lengths": {k: _distribution(v) for k, v in (split.lengths or {}).items()} or None,
            "counters": dict(split.counters), "duplicates": duplicates.get(name),
        }
    # findings: what training would refuse or what leaks is a problem; the rest is a warning
    for pair, found in leakage.items():
        if found["count"]:
            a, b = pair.split("/")
            problems.append({"check": "leakage", "message": f"{found['count']} example(s) of split '{a}' are also in "
                             f"split '{b}' (same content), e.g. {found['examples'][0][0]} = {found['examples'][0][1]}"})
    unchecked = [n for n in description.splits if n not in checked]
    if unchecked:
        warnings.append({"check": "leakage", "message": f"split(s) {unchecked}: no file or record hashes known, so "
                         f"duplicates and leakage were not checked"})
    for name, entry in report["splits"].items():
        if entry["count"] == 0:
            problems.append({"check": "counts", "message": f"split '{name}' has no examples"})
        dup = entry["duplicates"]
        if dup and dup["groups"]:
            warnings.append({"check": "duplicates", "message": f"split '{name}': {dup['extra_copies']} duplicate(s) "
                             f"in {dup['groups']} group(s) of identical content, e.g. {' = '.join(dup['examples'][0])}"})
        classes = entry["classes"]
        if classes and classes["missing"]:
            warnings.append({"check": "classes", "message": f"split '{name}' has no {description.label_unit} of "
                             f"class(es) {classes['missing']}"})
        if classes and classes["imbalance"] and classes["imbalance"] >= 10:
            warnings.append({"check": "classes", "message": f"split '{name}': the largest class has "
                             f"{classes['imbalance']}x the {description.label_unit}s of the smallest"})
    for reason, entry in invalid.items():
        if entry["count"]:
            warnings.append({"check": "invalid", "message": f"{entry['count']} left out or changed by the reader: "
                             f"{reason}" + (f", e.g. {entry['examples'][0]}" if entry["examples"] else "")})
    return finish()


def cheap_data_check(cfg, account: str | None = None, queued: bool = False) -> dict[str, Any]:
    """The quick part of `aift data check`, for `aift launch` before it queues a job: the owner's terms, the
    recipe's reading (counts) and leakage across splits from the digest's file hashes; no pictures, no image
    headers beyond the reader's. Raises DataError naming what would make training refuse or what leaks; returns
    {split: count}. ``cfg``: the resolved train config (dict or DictConfig)."""
    from omegaconf import DictConfig, OmegaConf

    from aifactory_train.records.lineage import DigestCache
    from aifactory_train.records.usage_terms import card_terms, check_usage, data_paths, datacards_for, kernel_host

    from fnmatch import fnmatchcase

    resolved = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    root = Path(resolved["data"]["root"])
    paths = data_paths(resolved["data"])
    check_usage(paths, resolved["recipe"], account or _account(resolved), queued=queued, config=resolved)
    hosts = [t.hosts for card in datacards_for(paths) for t in card_terms(card) if t.hosts is not None]
    if any(not any(fnmatchcase(kernel_host(), p) for p in patterns) for patterns in hosts):
        # a job queued from a login node the owner does not allow the data on: it is not read here (the job
        # checks the terms again where it starts)
        log.warning("data check: not reading '%s' on %s, which its owner's usage.hosts %s do not allow", root,
                    kernel_host(), hosts)
        return {}
    key = json.dumps([resolved["recipe"]["name"], resolved["data"]], sort_keys=True, default=str)
    if key in _CHEAP_DONE:  # a sweep's points on the same data: read it once
        return _CHEAP_DONE[key]
    previous, DigestCache.remembered = DigestCache.remembered, {}
    try:
        datamodule = _datamodule(resolved)
        datamodule.setup("fit")
        lineage = datamodule.lineage()
        describe = recipe_describe(datamodule)
        description = describe(datamodule, True) if describe else generic_description(datamodule, lineage)
        _, leakage, _ = duplicates_and_leakage(root, description.splits)
    finally:
        DigestCache.remembered = previous
    counts = {name: split.count for name, split in description.splits.items()}
    for name, count in counts.items():
        if count == 0:
            raise DataError(f"data.root '{root}': split '{name}' has no examples")
    for pair, found in leakage.items():
        if found["count"]:
            a, b = pair.split("/")
            raise DataError(f"data.root '{root}': {found['count']} example(s) of split '{a}' are also in split '{b}' "
                            f"(same content), e.g. {found['examples'][0][0]} = {found['examples'][0][1]}; remove "
                            f"them from one split (`aift data check` lists them), or --no-data-check")
    _CHEAP_DONE[key] = counts
    return counts


_CHEAP_DONE: dict[str, dict[str, int]] = {}


# -- pictures -------------------------------------------------------------------------------------------------
def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    _pyplot().close(fig)
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window (login nodes, jobs)
    import matplotlib.pyplot as plt

    return plt


def class_histogram(report: dict[str, Any], unit: str, out: Path) -> Path | None:
    splits = {n: s["classes"]["counts"] for n, s in report["splits"].items() if s["classes"]}
    if not splits:
        return None
    import numpy as np

    plt = _pyplot()
    names = list(next(iter(splits.values())))
    x = np.arange(len(names))
    width = 0.8 / len(splits)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(names) * len(splits) + 2), 3.6))
    for i, (split, counts) in enumerate(splits.items()):
        ax.bar(x + i * width - 0.4 + width / 2, [counts.get(n, 0) for n in names], width, label=split)
    ax.set_xticks(x, names, rotation=30 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center")
    units = "boxes" if unit == "box" else f"{unit}s"
    ax.set_ylabel(units)
    ax.set_title(f"{report['recipe']}: {units} per class and split")
    ax.legend()
    return _save(fig, out)


def box_histogram(description: DataDescription, out: Path) -> Path | None:
    boxes = [(name, s.boxes) for name, s in description.splits.items() if s.boxes]
    if not boxes:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, items in boxes:
        ax.hist([(w * h) ** 0.5 for _, w, h in items], bins=30, alpha=0.6, label=f"{name} ({len(items)})")
    ax.set_xlabel("box size: sqrt(width x height), pixels")
    ax.set_ylabel("boxes")
    ax.set_title("box sizes per split")
    ax.legend()
    return _save(fig, out)


def length_histogram(description: DataDescription, out: Path) -> Path | None:
    keys = sorted({k for s in description.splits.values() for k in (s.lengths or {})})
    if not keys:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, split in description.splits.items():
            values = (split.lengths or {}).get(key)
            if values:
                ax.hist(values, bins=30, alpha=0.6, label=name)
        ax.set_xlabel(key.replace("_", " "))
        ax.set_ylabel("examples")
        ax.legend()
    fig.suptitle("lengths per split (numbers only)")
    return _save(fig, out)


def contact_sheet(description: DataDescription, out: Path) -> Path | None:
    """A grid of samples per split with their labels drawn (boxes with their class, or the class as caption)."""
    if description.sample is None:
        return None
    import torch
    from torchvision.utils import draw_bounding_boxes

    plt = _pyplot()
    picks = []
    for name, split in description.splits.items():
        n = min(SHEET_PER_SPLIT, split.count)
        picks += [(name, round(i * (split.count - 1) / max(1, n - 1))) for i in range(n)]
    if not picks:
        return None
    columns = min(SHEET_PER_SPLIT, len(picks))
    rows = -(-len(picks) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.9 * columns, 2.1 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, index) in zip(axes.flat, picks):
        try:
            sample = description.sample(name, index)
        except Exception as err:  # noqa: BLE001 - one unreadable sample must not lose the whole report
            ax.set_title(f"{name}[{index}]: unreadable", fontsize=7)
            log.warning("contact sheet: %s[%d] could not be drawn: %s", name, index, err)
            continue
        image = sample.image
        if sample.boxes:
            image = draw_bounding_boxes(image, torch.tensor(sample.boxes, dtype=torch.float32).reshape(-1, 4),
                                        labels=sample.box_labels or None, colors="yellow", width=2)
        ax.imshow(image.permute(1, 2, 0).numpy())
        ax.set_title(f"{name}: {sample.caption}", fontsize=7)
    return _save(fig, out)


# -- reports --------------------------------------------------------------------------------------------------
def _fmt(d: dict[str, Any] | None, unit: str = "") -> str:
    if not d:
        return "-"
    return f"{d['min']:g}–{d['max']:g}{unit} (median {d['median']:g}, p95 {d['p95']:g})"


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Data check: {report['recipe']}", "",
             f"- data: `{report['data_root']}`", f"- digest: `{report['digest']}`",
             f"- status: **{report['status']}** (exit {report['exit_code']}), {report['duration_s']} s, "
             f"{report['created']}", ""]
    lines += ["## Problems", ""] + ([f"- {p['check']}: {p['message']}" for p in report["problems"]] or ["none"])
    lines += ["", "## Warnings", ""] + ([f"- {w['check']}: {w['message']}" for w in report["warnings"]] or ["none"])
    terms = report["usage_terms"] or {}
    lines += ["", "## Data card and usage terms", ""]
    lines += [f"- {k}: {v}" for k, v in report["datacard"].items()] or ["- no data card"]
    lines += [f"- usage terms: {terms.get('terms') or 'none (no restrictions)'}",
              f"- this use (user {terms.get('user')}, recipe {terms.get('recipe')}, host {terms.get('host')}, "
              f"account {terms.get('account')}): " + ("allowed" if terms.get("allowed") else f"refused: {terms.get('refusal')}")]
    if report["splits"]:
        lines += ["", "## Splits", "", "| split | count | duplicates | image sizes (w) | boxes (sqrt area px) |",
                  "|---|---|---|---|---|"]
        for name, s in report["splits"].items():
            dup = s["duplicates"]
            lines.append(f"| {name} | {s['count']} | {dup['extra_copies'] if dup else 'not checked'} | "
                         f"{_fmt((s['image_sizes'] or {}).get('width'))} | {_fmt((s['boxes'] or {}).get('sqrt_area_px'))} |")
        if any(s["classes"] for s in report["splits"].values()):
            names = report["classes"] or list(next(s for s in report["splits"].values() if s["classes"])["classes"]["counts"])
            lines += ["", "### Classes", "", "| split | " + " | ".join(names) + " | max/min |",
                      "|---" * (len(names) + 2) + "|"]
            for name, s in report["splits"].items():
                if s["classes"]:
                    lines.append(f"| {name} | " + " | ".join(str(s["classes"]["counts"].get(n, 0)) for n in names)
                                 + f" | {s['classes']['imbalance']} |")
        if any(s["lengths"] for s in report["splits"].values()):
            lines += ["", "### Lengths (numbers only)", "", "| split | measure | range |", "|---|---|---|"]
            for name, s in report["splits"].items():
                for key, dist in (s["lengths"] or {}).items():
                    lines.append(f"| {name} | {key} | {_fmt(dist)} |")
        if any(s["counters"] for s in report["splits"].values()):
            lines += ["", "### Counters", ""]
            lines += [f"- {name}: " + ", ".join(f"{k}={v}" for k, v in s["counters"].items())
                      for name, s in report["splits"].items() if s["counters"]]
    lines += ["", "## Leakage across splits", ""]
    if report["leakage"]:
        lines += [f"- {pair}: {f['count']}" + (f", e.g. {f['examples'][0][0]} = {f['examples'][0][1]}" if f["count"] else "")
                  for pair, f in report["leakage"].items()]
    else:
        lines.append("not checked")
    lines += ["", "## Left out or unreadable (from the readers)", ""]
    lines += [f"- {reason}: {e['count']}" + (f" (e.g. {', '.join(e['examples'])})" if e["examples"] else "")
              for reason, e in report["invalid"].items()] or ["none reported"]
    if report["pictures"]:
        lines += ["", "## Pictures", ""] + [f"![{k}]({v})" for k, v in report["pictures"].items()]
    sheet = report["contact_sheet"]
    if sheet and sheet.get("reason"):
        lines += ["", f"No contact sheet: {sheet['reason']}"]
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def default_out(recipe: str) -> Path:
    return Path("outputs") / recipe / "data_check" / time.strftime("%Y-%m-%d_%H-%M-%S")


def run_data_check(overrides: list[str], out: str | None) -> int:
    """`aift data check`: compose and validate the train config, check the data, write the reports, print a
    summary. Returns the exit status (0 healthy, 1 problems)."""
    import tempfile

    from omegaconf import OmegaConf

    from aifactory_train.records.config import compose_train_config, validate

    with tempfile.TemporaryDirectory() as run_dir:  # nothing is written there; paths.output_dir must resolve
        cfg = compose_train_config(overrides, run_dir)
        typed = validate(cfg)
        resolved = OmegaConf.to_container(cfg, resolve=True)
    folder = Path(out) if out else default_out(resolved["recipe"]["name"])
    try:  # before the data is read: a folder that cannot be written should not cost a check first
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AiftError(f"--out '{folder}' cannot be created: {err.strerror}") from None
    state = inspect(resolved, typed)
    report, description = state["report"], state["description"]
    if description is not None:
        unit = "box" if description.label_unit == "box" else description.label_unit
        drawn = {"class_histogram": class_histogram(report, unit, folder / "class_histogram.png"),
                 "box_sizes": box_histogram(description, folder / "box_sizes.png"),
                 "lengths": length_histogram(description, folder / "lengths.png"),
                 "contact_sheet": contact_sheet(description, folder / "contact_sheet.png")}
        report["pictures"] = {k: p.name for k, p in drawn.items() if p is not None}
        report["contact_sheet"] = ({"file": "contact_sheet.png", "reason": None} if drawn["contact_sheet"] else
                                   {"file": None, "reason": description.no_samples_reason or "the recipe gives no samples"})
    (folder / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    (folder / REPORT_MD).write_text(markdown(report))
    print_summary(report, folder)
    return report["exit_code"]


def print_summary(report: dict[str, Any], folder: Path) -> None:
    print(f"data check {report['recipe']}: {report['data_root']}")
    for name, split in report["splits"].items():
        dup = split["duplicates"]
        classes = split["classes"]
        print(f"  {name}: {split['count']} examples" + (f", classes {classes['counts']}" if classes else "")
              + (f", {dup['extra_copies']} duplicate(s)" if dup and dup["extra_copies"] else ""))
    for pair, found in report["leakage"].items():
        if found["count"]:
            print(f"  leakage {pair}: {found['count']}")
    terms = report["usage_terms"] or {}
    print(f"  usage terms: {terms.get('terms') or 'none'}: " + ("allowed" if terms.get("allowed") else "REFUSED"))
    for problem in report["problems"]:
        print(f"problem ({problem['check']}): {problem['message']}")
    for warning in report["warnings"]:
        print(f"warning ({warning['check']}): {warning['message']}")
    print(f"{report['status']} (exit {report['exit_code']}); wrote {folder / REPORT_JSON}, {REPORT_MD} and "
          f"{len(report['pictures'])} picture(s) in {folder}")


def record_hash(text: str) -> str:
    """A record's content hash for duplicates and leakage, blind to whitespace differences."""
    return hashlib.sha256(" ".join(text.split()).encode()).hexdigest()
