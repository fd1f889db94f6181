"""De-identification with deduce, before anything else sees the text.

`aift data deidentify recipe=clinical_notes data.root=RAW --out DIR` writes DIR/<split>.jsonl with the
configured text and target fields de-identified (names, dates, ages, BSNs, phone numbers, addresses,
institutions become tags such as ``[PERSOON-1]``; other fields are not copied, they may identify too), a data
card marked ``deidentified: true``, and ``deidentification_report.json`` with counts per tag type, never the
originals.

Install path: deduce 3.0.6 pins ``regex<2025`` while transformers 5 needs ``regex>=2025.10.22``. deduce runs
correctly on the newer regex (the tests check it finds every identifier planted in the synthetic notes), so
the project installs deduce with ``pip install --no-deps`` after the rest (see the Makefile) and its real
dependencies (docdeid, rapidfuzz, frozendict) through pyproject. A single environment keeps the inline
option (``data.deidentify=inline``) possible; the price is that pip's resolver cannot check deduce's pin.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

from aifactory_train.recipe import ConfigError

log = logging.getLogger(__name__)

REPORT_FILE = "deidentification_report.json"
INSTALL_HINT = "pip install --no-deps deduce==3.0.6 (after `pip install aifactory-train`; see the README)"


@contextlib.contextmanager
def deduce_cache_lock():
    """One process at a time loads deduce. Its first start on an install builds lookup tables and pickles them into
    its package folder, without a lock and not atomically; a second process starting meanwhile (two jobs of a sweep,
    two test workers) read the half-written pickle and failed with UnpicklingError. The lock is an flock on a file in
    the temp folder, named after deduce's folder, so it also covers processes of other virtual environments."""
    import fcntl
    import hashlib
    import tempfile

    import deduce

    folder = str(Path(deduce.__file__).resolve().parent)
    lock_file = Path(tempfile.gettempdir()) / f"aift-deduce-{hashlib.sha256(folder.encode()).hexdigest()[:16]}.lock"
    # read-only is enough for flock, so a lock file another user created (a shared install) opens too
    handle = os.open(lock_file, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield lock_file
    finally:
        os.close(handle)  # releases the lock


class Deidentifier:
    """Text in, text with identifiers replaced by tags out; counts the tags it placed (never the originals)."""

    def __init__(self) -> None:
        try:
            from deduce import Deduce
        except ImportError as err:
            raise ConfigError(f"de-identification needs the 'deduce' package, which cannot be imported ({err}); "
                              f"install it with: {INSTALL_HINT}") from None
        log.info("loading deduce (its first start on a new install builds lookup tables, about a minute)")
        with deduce_cache_lock():
            self._deduce = Deduce()
        self.counts: Counter = Counter()
        self.texts = 0

    def __call__(self, text: str) -> str:
        document = self._deduce.deidentify(text)
        self.counts.update(annotation.tag for annotation in document.annotations)
        self.texts += 1
        return document.deidentified_text


def deidentify_dataset(data: dict[str, Any], out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """De-identify every split of ``data`` (the composed ``data`` config) into ``out``; return the report."""
    from aifactory_train.recipe import DATACARD_FILE, read_datacard
    from .data import read_jsonl
    from aifactory_train.recipe import prepare_output_folder, write_datacard

    root = Path(data["root"])
    text_field, target_field = data["text_field"], data["target_field"]
    # read (and check) everything before writing anything
    splits = {split: read_jsonl(root / file, split, text_field, target_field) for split, file in data["splits"].items()}
    owned = tuple(data["splits"].values()) + (REPORT_FILE, DATACARD_FILE)
    out = prepare_output_folder(out, overwrite, owned=owned)
    deidentifier = Deidentifier()
    started = time.perf_counter()
    report: dict[str, Any] = {"tool": f"deduce {metadata.version('deduce')}", "source": str(root.resolve()),
                              "fields": [text_field, target_field], "splits": {}}
    for split, records in splits.items():
        before = Counter(deidentifier.counts)
        target = out / data["splits"][split]
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            for _, note, summary in records:
                row = {text_field: deidentifier(note), target_field: deidentifier(summary)}
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp.replace(target)
        report["splits"][split] = {"records": len(records),
                                   "tags": dict(sorted((deidentifier.counts - before).items()))}
    seconds = time.perf_counter() - started
    notes = sum(len(r) for r in splits.values())
    report["tags"] = dict(sorted(deidentifier.counts.items()))
    report["records"] = notes
    report["seconds"] = round(seconds, 3)
    report["notes_per_s"] = round(notes / seconds, 1) if seconds > 0 else None
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    card = read_datacard(root)
    card.pop("usage", None)  # (as text; the terms themselves are carried below, as the owner wrote them)
    card.pop("terms", None)
    card.pop("derived_from", None)
    card.update({"deidentified": "true", "deidentification": f"{report['tool']} on fields {text_field}, {target_field}",
                 "source": f"{card.get('source', root)} -> aift data deidentify"})
    card["derived_from"] = derived_from(root, data["splits"], report["tool"])
    write_datacard(out, card)
    return report


def derived_from(root: Path, splits: dict[str, str], tool: str) -> dict[str, Any]:
    """What a derived dataset's card carries of its source: the source root and its digest (as `aift data digest`
    prints it for the source), and every data card that covered the source, whole (owner, consent, ``usage``), so
    that the source owner's terms keep applying to the derived data wherever it is written (usage_terms.py)."""
    from aifactory_train.recipe import DatasetLineage, SplitLineage, digest_files
    from aifactory_train.recipe import datacards_for, load_datacard

    lineage = DatasetLineage(name="clinical_notes", root=str(root))
    for split, file in splits.items():
        lineage.splits[split] = SplitLineage(split, 0, digest_files(root, [file], [split]))
    cards = datacards_for([root, *(root / file for file in splits.values())])
    return {"source": str(root.resolve()), "digest": lineage.digest,
            "splits": {split: s.digest for split, s in lineage.splits.items()}, "step": f"aift data deidentify ({tool})",
            "cards": [{"path": str(path), "card": load_datacard(path)} for path in cards]}
