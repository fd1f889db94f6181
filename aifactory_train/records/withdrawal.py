"""Withdrawn subjects: a data card may name a list of subject or record identifiers whose consent was withdrawn;
their records are left out by the recipes' readers, before any read reaches a model (train, eval, and what a
recipe's predict reads through the same readers).

The card::

    withdrawals:
      list: withdrawn.txt     # one identifier a line (blank lines and `#` comments ignored), beside the card
      field: patient_id       # the record field (JSONL, CSV manifest) holding the subject's identifier

A record is withdrawn when one of its identifiers is in the list: the value of ``field`` in the record (a record of
fields: a JSONL note, a manifest row), and for every record its file's path relative to the card's folder, its
file name and its file name without extension (an image named after its subject or record).

A reader calls :func:`withdrawn` once per record, before the record is kept (recipes/*/data.py). Every card at or
above the file applies, as for the usage terms. What was left out is counted per list, and the run records each
list's SHA-256 and the count (``summary.json``'s ``dataset.datacard.withdrawn``, MLflow ``aift.data.withdrawn``).
`check_usage` reads every list before anything else is read: a list that cannot be read refuses the run.

Not covered: copies of the data outside a card's folder, and a model trained before the withdrawal (`aift data runs`
lists the runs that used the data; retrain them).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from aifactory_train.errors import DataError

CARD_KEY = "withdrawals"
KEYS = ("list", "field")


@dataclass
class WithdrawalList:
    card: Path
    path: Path
    field: str | None
    ids: frozenset[str]
    sha256: str
    excluded: int = 0
    excluded_ids: set[str] = field(default_factory=set)

    def as_dict(self) -> dict[str, Any]:
        return {"card": str(self.card), "list": str(self.path), "sha256": self.sha256, "ids": len(self.ids),
                "field": self.field, "excluded": self.excluded}


def parse(card: Mapping[str, Any], card_path: Path) -> WithdrawalList | None:
    """The card's withdrawal list, read and hashed; None without one. DataError naming the card, the key and the
    value for a section or list that cannot be read."""
    section = card.get(CARD_KEY)
    if section is None:
        return None
    where = f"data card '{card_path}': {CARD_KEY}"
    if isinstance(section, str):
        section = {"list": section}
    if not isinstance(section, dict):
        raise DataError(f"{where} must be a mapping of {', '.join(KEYS)} (e.g. {{list: withdrawn.txt, field: "
                        f"patient_id}}), not {section!r}")
    unknown = sorted(set(section) - set(KEYS), key=str)
    if unknown:
        raise DataError(f"{where} has unknown key(s) {unknown}; valid: {', '.join(KEYS)}")
    name, record_field = section.get("list"), section.get("field")
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"{where}.list must be the path of the list file (relative to the card's folder), not "
                        f"{name!r}")
    if record_field is not None and (not isinstance(record_field, str) or not record_field.strip()):
        raise DataError(f"{where}.field must be a record field name, not {record_field!r}")
    path = (Path(card_path).parent / name).resolve()
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{where}.list '{name}': '{path}' cannot be read ({err.strerror}); a withdrawal list must be "
                        f"readable to use the data (withdrawn subjects would otherwise be trained on)") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{where}.list '{path}' is not UTF-8 text (byte 0x{data[err.start]:02x} at byte "
                        f"{err.start + 1}); one identifier a line") from None
    ids = frozenset(line.split("#", 1)[0].strip() for line in text.splitlines()) - {""}
    return WithdrawalList(Path(card_path), path, record_field, ids, hashlib.sha256(data).hexdigest())


# -- the readers' call -------------------------------------------------------------------------------------------
_LOCK = threading.Lock()
_BY_FOLDER: dict[Path, list[WithdrawalList]] = {}
_BY_LIST: dict[tuple[Path, str], WithdrawalList] = {}  # one count per list (and version of it) in this process


_BY_NAME: dict[str, list[WithdrawalList]] = {}  # the folder as the reader spells it: no resolve per record


def lists_for(folder: Path) -> list[WithdrawalList]:
    """The withdrawal lists of every card at or above ``folder`` (resolved), read once per process."""
    from aifactory_train.records.usage_terms import datacards_for, load_datacard

    spelled = str(folder)
    with _LOCK:
        if spelled in _BY_NAME:
            return _BY_NAME[spelled]
    folder = Path(folder).resolve()
    with _LOCK:
        if folder in _BY_FOLDER:
            _BY_NAME[spelled] = _BY_FOLDER[folder]
            return _BY_FOLDER[folder]
    lists = []
    for card_path in datacards_for(folder):
        parsed = parse(load_datacard(card_path), card_path)
        if parsed is not None:
            with _LOCK:
                parsed = _BY_LIST.setdefault((parsed.path, parsed.sha256), parsed)
            lists.append(parsed)
    with _LOCK:
        _BY_FOLDER[folder] = _BY_NAME[spelled] = lists
    return lists


def reload() -> None:
    """Forget the lists read so far (and their counts): `check_usage` calls it before a command reads any data, so
    a list changed since (a subject withdrew an hour ago) is read again."""
    with _LOCK:
        _BY_NAME.clear()
        _BY_FOLDER.clear()
        _BY_LIST.clear()


def withdrawn(path: str | Path, record: Mapping[str, Any] | None = None) -> bool:
    """True (and counted) when the record read from the file ``path`` (``record``: its fields, for a file of
    records) belongs to a withdrawn subject or record. The call every recipe reader makes, once per record."""
    path = Path(path)
    lists = lists_for(path.parent)
    if not lists:
        return False
    resolved = path.resolve()
    for wl in lists:
        names = {resolved.name, resolved.stem}
        try:
            names.add(resolved.relative_to(wl.card.parent.resolve()).as_posix())
        except ValueError:
            pass
        if record is not None and wl.field is not None and record.get(wl.field) not in (None, ""):
            names.add(str(record[wl.field]))
        hit = names & wl.ids
        if hit:
            with _LOCK:
                wl.excluded += 1
                wl.excluded_ids.update(hit)
            return True
    return False


def summary(folder: str | Path) -> list[dict[str, Any]]:
    """The lists that apply to the data at ``folder``: card, list, SHA-256, identifiers, records left out so far in
    this process (by the readers)."""
    return [wl.as_dict() for wl in lists_for(Path(folder))]


def describe(folder: str | Path) -> str | None:
    """One line for the run's data card record, or None when no list applies."""
    lists = summary(folder)
    if not lists:
        return None
    return "; ".join(f"{w['list']} (sha256 {w['sha256']}, {w['ids']} ids): {w['excluded']} record(s) left out"
                     for w in lists)
