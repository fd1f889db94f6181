"""`aift predict` for clinical_notes: a draft summary of every note in JSONL files, for a clinician to check.

The notes are prepared as the eval split's are: each record's note (the field ``data.text_field`` names; no
summary needed) must be de-identified (the data card at or above the file says ``deidentified: true``, or
``data.deidentify=inline`` runs deduce on it here first); the prompt is the checkpoint's template with the note cut
to leave room for ``data.max_target_length`` summary tokens; the summary is the greedy one that validation scores
with ROUGE-L. A row holds the file, the line and the summary, never the note: a reader joins them by line.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

from aifactory_train.recipe import ConfigError, DataError

log = logging.getLogger(__name__)


def check_marked_deidentified(path: Path) -> None:
    """Refuse notes whose nearest data card does not say they are de-identified."""
    from aifactory_train.recipe import DATACARD_FILE, read_datacard
    from aifactory_train.recipe import datacard_root

    root = datacard_root(path)
    card = read_datacard(root) if root is not None else {}
    if card.get("deidentified", "").lower() == "true":
        return
    where = (f"its data card '{root / DATACARD_FILE}' has deidentified: {card.get('deidentified', 'missing')}"
             if root is not None else f"no {DATACARD_FILE} at or above it says so")
    raise DataError(f"input '{path}' is not marked de-identified ({where}); the model reads de-identified notes "
                    f"only. Add data.deidentify=inline to run deduce on the notes first, or predict on the output of "
                    f"`aift data deidentify`")


def read_notes(files: list[Path], text_field: str, deidentify: str) -> list[tuple[Path, int, str]]:
    """(file, line, note) of every record of every file, each file checked before any note is used."""
    from aifactory_train.recipe import check_choice
    from .config import DEIDENTIFY_MODES
    from .data import read_records

    check_choice("data.deidentify", deidentify, DEIDENTIFY_MODES)  # validate() checked it; this runs outside it too
    notes = []
    for path in files:
        if deidentify != "inline":
            check_marked_deidentified(path)
        records = read_records(path, {"data.text_field": text_field})
        if not records:
            raise DataError(f"input '{path}' has no records; each line must be one JSON object with a "
                            f"'{text_field}' field (data.text_field)")
        notes += [(path, line, values[0]) for line, values in records]
    if deidentify == "inline":
        from .deidentify import Deidentifier

        deidentifier = Deidentifier()
        notes = [(path, line, deidentifier(note)) for path, line, note in notes]
        log.info("de-identified inline: %s", dict(sorted(deidentifier.counts.items())))
    return notes


def predict_files(module, files: list[Path], batch_size: int, options: dict[str, Any]) -> Iterator[dict]:
    from .data import PromptEncoder, left_padded, tokenizer_from_files

    notes = read_notes(files, options["text_field"], options["deidentify"])
    if not module.tokenizer_files:
        raise ConfigError("ckpt_path: this checkpoint holds no tokenizer; it was not written by clinical_notes")
    module.tokenizer = tokenizer_from_files(module.tokenizer_files)
    info = module.hparams.data_info
    encoder = PromptEncoder(module.tokenizer, info["prompt_template"], info["max_length"], info["max_target_length"])
    truncated = 0
    for start in range(0, len(notes), batch_size):
        chunk = notes[start:start + batch_size]
        rows = [encoder.encode_note(note) for _, _, note in chunk]
        ids, mask = left_padded([r["prompt_ids"] for r in rows], module.tokenizer.pad_token_id)  # as eval's batches
        summaries = module.generate(ids.to(module.device), mask.to(module.device))
        for (path, line, _), row, summary in zip(chunk, rows, summaries):
            truncated += row["note_truncated"]
            yield {"file": str(path), "line": line, "summary": summary, "note_truncated": row["note_truncated"]}
    if truncated:
        log.warning("%d of %d notes were longer than data.max_length=%d tokens allows with room for the summary and "
                    "were cut (their rows say note_truncated)", truncated, len(notes), info["max_length"])
