"""`aift data check` for clinical_notes: counts, lengths and content hashes of the notes, never their text (kept
apart from the reader in data.py). There is no contact sheet: the notes are sensitive.

Duplicates and leakage compare notes (the model's input) by a hash of their text, so the same note in train and
val is found even where the two JSONL files differ; the report names them by file and line only."""

from __future__ import annotations

from aifactory_train.recipe import DataDescription, SplitDescription, record_hash


def describe(datamodule, cheap: bool = False) -> DataDescription:
    splits = {}
    for split, records in datamodule.records.items():
        name = datamodule.split_files[split]
        description = SplitDescription(count=len(records), record_ids=[f"{name} line {line}" for line, _, _ in records],
                                       record_hashes=[record_hash(note) for _, note, _ in records])
        if not cheap:
            encoded = datamodule.encoded.get(split, [])
            description.lengths = {"note_chars": [len(note) for _, note, _ in records],
                                   "summary_chars": [len(summary) for _, _, summary in records],
                                   "example_tokens": [len(row["input_ids"]) for row in encoded]}
            counts = datamodule.counts.get(split, {})
            description.counters = {key: int(counts[key]) for key in ("note_truncated", "summary_truncated")
                                    if key in counts}
        splits[split] = description
    return DataDescription(splits=splits, no_samples_reason="the notes are sensitive text: no samples are shown",
                           notes=["lengths and counts only; no note or summary text is read into this report"])
