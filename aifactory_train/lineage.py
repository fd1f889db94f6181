"""Data lineage: which data trained a model, whose it is, and what consent covers it.

Each split gets a SHA-256 digest over the full content of every file it uses (path relative to the data
root, label and bytes), so two runs share a digest only if they saw exactly the same data. MLflow's own
Hugging Face digest reads only the first 10,000 rows, which is why we pass ours.

A data root may carry a ``datacard.yaml`` (owner, license, consent, source, contact); its fields are
logged with the run and copied into summary.json. `aift data synth` writes one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

DATACARD_FILE = "datacard.yaml"
DATACARD_FIELDS = ("name", "owner", "license", "consent", "source", "contact", "description", "deidentified",
                   "deidentification")


def digest_files(root: str | Path, paths: Iterable[str], labels: Iterable[Any]) -> str:
    """SHA-256 over (relative path, label, file bytes) of every record, in the given order."""
    root = Path(root)
    sha = hashlib.sha256()
    for path, label in zip(paths, labels):
        full = Path(path) if Path(path).is_absolute() else root / path
        try:
            rel = full.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            rel = full.as_posix()
        sha.update(f"{rel}\0{label}\0".encode())
        with open(full, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                sha.update(chunk)
        sha.update(b"\n")
    return sha.hexdigest()


def read_datacard(root: str | Path) -> dict[str, str]:
    """The data root's datacard.yaml (known fields only), or {} when there is none."""
    import yaml

    from aifactory_train.errors import DataError

    path = Path(root) / DATACARD_FILE
    if not path.is_file():
        return {}
    try:
        card = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise DataError(f"data card '{path}' is not valid YAML: {err}") from None
    if not isinstance(card, dict):
        raise DataError(f"data card '{path}' must be a mapping of {', '.join(DATACARD_FIELDS)}")
    return {k: str(v) for k, v in card.items() if k in DATACARD_FIELDS}


@dataclass
class SplitLineage:
    name: str
    num_rows: int
    digest: str
    dataset: Any = None  # the datasets.Dataset, for MLflow's dataset input (not serialised)


@dataclass
class DatasetLineage:
    name: str
    root: str
    splits: dict[str, SplitLineage] = field(default_factory=dict)
    datacard: dict[str, str] = field(default_factory=dict)
    skipped_files: list[str] = field(default_factory=list)

    @property
    def digest(self) -> str:
        sha = hashlib.sha256()
        for name in sorted(self.splits):
            sha.update(f"{name}:{self.splits[name].digest}\n".encode())
        return sha.hexdigest()

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "root": self.root,
            "digest": self.digest,
            "splits": {n: {"num_rows": s.num_rows, "digest": s.digest} for n, s in self.splits.items()},
            "datacard": self.datacard,
            "skipped_files": len(self.skipped_files),
        }
