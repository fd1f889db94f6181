"""clinical_notes: every bad JSONL record is one clear error naming the file and line (never the text), or
(data.on_invalid=skip) a counted skip.

Each case writes a crafted real JSONL file into a private copy of the de-identified synthetic notes and calls the
DataModule's setup, as `aift train` and `aift data check` do; one case runs the CLI end to end.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from aifactory_train.errors import DataError
from aifactory_train.recipes.clinical_notes.data import ClinicalNotesDataModule
from conftest import aift

SPLITS = {"train": "train.jsonl", "val": "val.jsonl"}
BIG_NOTE = "Patient meldt hoofdpijn en duizeligheid. " * 600_000  # ~24 MB on one line


@pytest.fixture
def notes(clinical_data, tmp_path) -> Path:
    return Path(shutil.copytree(clinical_data, tmp_path / "notes"))


def datamodule(root: Path, **kwargs) -> ClinicalNotesDataModule:
    return ClinicalNotesDataModule(root=str(root), splits=SPLITS, max_length=128, max_target_length=32,
                                   tokenizer_vocab_size=300, batch_size=4, **kwargs)


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def replace_line(path: Path, index: int, raw: bytes) -> None:
    rows = lines(path)
    rows[index] = raw
    path.write_bytes(b"\n".join(rows) + b"\n")


def row(path: Path, index: int) -> dict:
    return json.loads(lines(path)[index])


# -- each damage returns the pieces the one-line error must name and the text it must not show ---------------
def line_not_json(root):
    replace_line(root / "train.jsonl", 2, b'{"note": "Hoofdpijn", summary: "x"}')
    return ["train.jsonl line 3", "not valid JSON"], "Hoofdpijn"


def line_not_an_object(root):
    replace_line(root / "train.jsonl", 4, b'["Hoofdpijn", "x"]')
    return ["train.jsonl line 5", "a list, not a JSON object"], "Hoofdpijn"


def file_not_utf8(root):
    note = row(root / "val.jsonl", 1)
    replace_line(root / "val.jsonl", 1, json.dumps({**note, "note": "Caf\u00e9 " + note["note"]},
                                                   ensure_ascii=False).encode("latin-1"))
    return ["val.jsonl line 2", "not UTF-8", "0xe9"], note["note"][:30]


def note_of_24_mb(root):
    note = row(root / "train.jsonl", 7)
    replace_line(root / "train.jsonl", 7, json.dumps({**note, "note": BIG_NOTE}).encode())
    size = len(lines(root / "train.jsonl")[7]) + 1
    return ["train.jsonl line 8", f"the record is {size} bytes", "more than data.max_record_bytes=1048576"], BIG_NOTE[:40]


def field_missing(root):
    note = row(root / "train.jsonl", 0)
    replace_line(root / "train.jsonl", 0, json.dumps({"note": note["note"], "samenvatting": "x"}).encode())
    return ["train.jsonl line 1", "no field 'summary' (data.target_field)", "samenvatting"], note["note"][:30]


def field_not_text(root):
    note = row(root / "val.jsonl", 3)
    replace_line(root / "val.jsonl", 3, json.dumps({**note, "summary": 42}).encode())
    return ["val.jsonl line 4", "field 'summary' (data.target_field) must be a string, not int"], note["note"][:30]


def note_empty(root):
    note = row(root / "val.jsonl", 0)
    replace_line(root / "val.jsonl", 0, json.dumps({**note, "note": "   "}).encode())
    return ["val.jsonl line 1", "field 'note' (data.text_field) is empty"], note["summary"][:30]


def val_note_also_in_train(root):
    note = row(root / "train.jsonl", 10)
    replace_line(root / "val.jsonl", 5, json.dumps(note, ensure_ascii=False).encode())
    return ["val.jsonl line 6 (split 'val')", "the same note as", "train.jsonl line 11 (split 'train')"], \
        note["note"][:30]


CASES = [line_not_json, line_not_an_object, file_not_utf8, note_of_24_mb, field_missing, field_not_text, note_empty,
         val_note_also_in_train]


@pytest.mark.parametrize("damage", CASES, ids=lambda f: f.__name__)
def test_bad_record_is_one_line_naming_file_and_line_never_the_text(damage, notes):
    expected, text = damage(notes)
    with pytest.raises(DataError) as err:
        datamodule(notes).setup("fit")
    message = str(err.value)
    assert "\n" not in message and len(message) < 1000
    for piece in expected:
        assert piece in message, (piece, message)
    assert text not in message


def test_skip_leaves_bad_records_out_and_counts_them_per_reason(notes):
    total = {split: len(lines(notes / name)) for split, name in SPLITS.items()}
    for damage in (line_not_json, note_of_24_mb, file_not_utf8, note_empty, val_note_also_in_train):
        damage(notes)
    dm = datamodule(notes, on_invalid="skip")
    dm.setup("fit")
    counts = {reason: entry["count"] for reason, entry in dm.invalid_records.items()}
    assert counts == {"bad_json": 1, "oversize": 1, "not_utf8": 1, "empty_field": 1, "shared_across_splits": 1}
    assert dm.invalid_records["oversize"]["first_paths"] == [f"{notes / 'train.jsonl'}:8"]
    assert len(dm.records["train"]) == total["train"] - 2 and len(dm.records["val"]) == total["val"] - 3
    dataset = dm.lineage().as_dict()
    assert dataset["skipped_files"] == 5 and dataset["invalid_records"]["not_utf8"]["count"] == 1
    assert dataset["datacard"]["skipped_oversize"] == "1"
    assert BIG_NOTE[:40] not in json.dumps(dataset)


def test_max_record_bytes_is_configurable(notes):
    longest = max(len(line) for line in lines(notes / "train.jsonl"))
    with pytest.raises(DataError, match=rf"more than data.max_record_bytes={longest - 1}"):
        datamodule(notes, max_record_bytes=longest - 1).setup("fit")


def test_cli_refuses_a_24_mb_note_and_writes_nothing(notes, tmp_path):
    from conftest import runs_in

    expected, text = note_of_24_mb(notes)
    work = tmp_path / "work"
    work.mkdir()
    result = aift("train", "recipe=clinical_notes", f"data.root={notes}", "debug=smoke", "hydra.run.dir=out", cwd=work)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    assert all(piece in result.stderr for piece in expected), result.stderr[-2000:]
    assert text not in result.stderr + result.stdout
    assert not runs_in(work / "mlflow.db")
    written = [p.relative_to(work / "out").as_posix() for p in (work / "out").rglob("*") if p.is_file()]
    assert [p for p in written if not p.startswith(".hydra/") and not p.endswith(".log")] == [], written
