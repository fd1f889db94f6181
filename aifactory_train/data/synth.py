"""What every recipe's `aift data synth` shares: never overwrite data by accident, always write a data card."""

from __future__ import annotations

import shutil
from pathlib import Path

from aifactory_train.errors import DataError
from aifactory_train.records.lineage import DATACARD_FILE


def prepare_output_folder(out: str | Path, overwrite: bool, owned: tuple[str, ...]) -> Path:
    """``out`` ready to write into: new or empty; with ``overwrite`` only the ``owned`` entries are removed,
    so a user's other files in that folder survive."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DataError(f"--out '{out}' is not empty; choose a new folder, or pass --overwrite to replace its dataset")
        for name in owned:
            shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_datacard(out: Path, card: dict[str, str]) -> None:
    import yaml

    (out / DATACARD_FILE).write_text(yaml.safe_dump(card, sort_keys=False))
