"""clinical_notes data: (note -> summary) JSONL splits, de-identified, tokenized for causal-LM fine-tuning.

Reading order, top to bottom:

1. ``read_jsonl`` reads one split, checking every record (not UTF-8, not JSON, a missing or empty field, longer
   than ``data.max_record_bytes``: the error names the file and line, never the text), and a note that is also in
   an earlier split is found. ``data.on_invalid=error`` (default) stops the run; ``skip`` leaves the record out
   and counts it per reason (``invalid_records``, the lineage, summary.json, MLflow).
2. The data must be de-identified: its data card says ``deidentified: true`` (written by
   `aift data deidentify`), or ``data.deidentify=inline`` runs deduce here, before anything else sees the text.
3. The tokenizer: the pretrained model's (``data.tokenizer_path``), or a byte-level BPE trained here on the
   de-identified training text; on resume and in `aift eval` the checkpoint's own (``adopt_checkpoint``).
4. ``PromptEncoder`` builds ``bos + template(note) + summary + eos`` with the loss only on the summary; a note
   too long for ``data.max_length`` is truncated (and counted, never dropped).
5. Optional packing puts several examples in one row, with position ids restarting per example (transformers
   then keeps attention inside each example).

The text is held in memory only: records go into ``datasets.Dataset.from_dict`` and are tokenized with
``keep_in_memory``, so no Arrow cache with note text is written anywhere (``load_dataset`` would write one under
~/.cache, outside the run and out of the data owner's control).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import torch

from aifactory_train.recipe import DataError
from aifactory_train.recipe import DataLoader  # resumes mid-epoch (torchdata)
from aifactory_train.recipe import shuffled
from aifactory_train.recipe import DatasetLineage, InvalidRecords, SplitLineage, digest_files, read_datacard
from aifactory_train.recipe import withdrawn
from .config import MISSING_SPLIT, check_deidentified

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
TOKENIZER_CHECKPOINT_KEY = "aift_tokenizer"  # {file name: text} of the tokenizer, inside every checkpoint
IGNORE_INDEX = -100


# -- 1. reading ---------------------------------------------------------------------------------------
DEFAULT_MAX_RECORD_BYTES = 1 << 20  # 1 MiB: long discharge letters are tens of kB; a 24 MB "note" is an export error


def _lines(path: Path, max_record_bytes: int):
    """(line number, its bytes, or None when longer than ``max_record_bytes``, its size). A longer line is never
    held whole: it is read past in chunks, so one 24 MB record costs no 24 MB string."""
    with open(path, "rb") as handle:
        line_number = 0
        while True:
            raw = handle.readline(max_record_bytes + 1)
            if not raw:
                return
            line_number += 1
            if len(raw) == max_record_bytes + 1 and not raw.endswith(b"\n"):
                size = len(raw)
                while chunk := handle.readline(1 << 20):
                    size += len(chunk)
                    if chunk.endswith(b"\n"):
                        break
                yield line_number, None, size
            else:
                yield line_number, raw, len(raw)


def read_records(path: Path, fields: dict[str, str], max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
                 invalid: InvalidRecords | None = None) -> list[tuple[int, list[str]]]:
    """(line number, [the value of each field]) of every record of a JSONL file; ``fields`` maps the config key
    that names a field to the field (``{"data.text_field": "note"}``). Errors name the file, line and field, never
    the text. ``invalid``: what to do with a bad record (default: stop, with no data.on_invalid hint)."""
    invalid = invalid if invalid is not None else InvalidRecords("error", hint=None)
    records = []
    for line_number, raw, size in _lines(path, max_record_bytes):
        where = f"{path}:{line_number}"
        if raw is None:
            invalid("oversize", where, f"{path} line {line_number}: the record is {size} bytes, more than "
                                       f"data.max_record_bytes={max_record_bytes}; expected one note per line (raise "
                                       f"data.max_record_bytes if notes this long are real)")
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            invalid("not_utf8", where, f"{path} line {line_number}: not UTF-8 text (byte 0x{raw[err.start]:02x} at "
                                       f"byte {err.start + 1} of the line); save the file as UTF-8")
            continue
        if line_number == 1:
            line = line.removeprefix("\ufeff")  # a BOM, as some editors write it, is not part of the record
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            invalid("bad_json", where, f"{path} line {line_number}: not valid JSON ({err.msg} at column "
                                       f"{err.colno}); each line must be one JSON object")
            continue
        if not isinstance(record, dict):
            invalid("bad_json", where, f"{path} line {line_number}: a {type(record).__name__}, not a JSON object")
            continue
        if withdrawn(path, record):  # a subject who withdrew consent (the card's withdrawal list): never read on
            continue
        values, problem = [], None
        for key, name in fields.items():
            if name not in record:
                problem = "missing_field", (f"{path} line {line_number}: the record has no field '{name}' ({key}); "
                                            f"its fields are {sorted(record)}; set {key} to the right one")
                break
            value = record[name]
            if not isinstance(value, str):
                problem = "missing_field", (f"{path} line {line_number}: field '{name}' ({key}) must be a string, "
                                            f"not {type(value).__name__}")
                break
            if not value.strip():
                what = " and summary" if len(fields) > 1 else ""
                problem = "empty_field", (f"{path} line {line_number}: field '{name}' ({key}) is empty; every "
                                          f"record needs a non-empty note{what} (remove or complete this record)")
                break
            values.append(value)
        if problem is not None:
            invalid(problem[0], where, problem[1])
            continue
        records.append((line_number, values))
    return records


def read_jsonl(path: Path, split: str, text_field: str, target_field: str,
               max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
               invalid: InvalidRecords | None = None) -> list[tuple[int, str, str]]:
    """(line number, note, summary) of every record of one split."""
    if not path.is_file():
        raise DataError(MISSING_SPLIT.format(split=split, path=path))
    records = read_records(path, {"data.text_field": text_field, "data.target_field": target_field},
                           max_record_bytes, invalid)
    if not records:
        raise DataError(f"data.splits.{split}: '{path}' has no records"
                        + (f" left after data.on_invalid=skip left out {len(invalid)} record(s)"
                           if invalid is not None and len(invalid) else ""))
    return [(line, note, summary) for line, (note, summary) in records]


# -- 3. tokenizer -------------------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (no unknown tokens, any script) trained on the de-identified training text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # users of the exported model call tokenizer(prompt): give them the <s> the model was trained with
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise DataError(f"tokenizer folder '{path}' cannot be loaded: {str(err).splitlines()[0]}") from None
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer folder '{path}': the tokenizer has no eos_token; the model could not learn where "
                        f"a summary ends")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padded positions carry no loss, so any id works
    return tokenizer


def tokenizer_files(tokenizer) -> dict[str, str]:
    """The tokenizer's save_pretrained files as text (kept inside checkpoints)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_text(encoding="utf-8") for p in sorted(Path(tmp).iterdir()) if p.is_file()}


# The only file names a checkpoint's tokenizer may have: what save_pretrained writes for a fast tokenizer (ours:
# tokenizer.json and tokenizer_config.json; a pretrained one may add the others). The names come from the
# checkpoint, which anyone can craft: any other name (``../../x``, ``/tmp/x``) would be a file written elsewhere.
TOKENIZER_FILE_NAMES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                        "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json")


def check_tokenizer_files(files: Any, source: str) -> dict[str, str]:
    """The {file name: text} a checkpoint's tokenizer holds, refused (CheckpointError naming ``source`` and the
    entry) unless every name is a known tokenizer file and tokenizer_config.json points at no file and no code."""
    from aifactory_train.recipe import CheckpointError

    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{source}: its '{TOKENIZER_CHECKPOINT_KEY}' entry is not a tokenizer (a "
                              f"{type(files).__name__}); it was not written by the clinical_notes recipe")
    for name, text in files.items():
        if name not in TOKENIZER_FILE_NAMES or not isinstance(text, str):
            raise CheckpointError(f"{source}: its tokenizer has an entry {name!r} ({type(text).__name__}); a "
                                  f"checkpoint's tokenizer may hold only text files named {', '.join(TOKENIZER_FILE_NAMES)}; "
                                  f"refused, nothing was written")
    try:
        config = json.loads(files.get("tokenizer_config.json", "{}"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{source}: its tokenizer's tokenizer_config.json is not valid JSON ({err.msg})") from None
    for key, value in (config.items() if isinstance(config, dict) else ()):
        # transformers reads a *_file key as a path (absolute, or relative to the folder) and auto_map as code to
        # import; save_pretrained writes neither, so a checkpoint that has them was made to reach outside
        if key == "auto_map" or (key.endswith("_file") and value is not None):
            raise CheckpointError(f"{source}: its tokenizer's tokenizer_config.json sets {key}={value!r}; a "
                                  f"checkpoint's tokenizer may not name files or code; refused")
    return files


def tokenizer_from_files(files: dict[str, str], source: str = "the checkpoint"):
    files = check_tokenizer_files(files, source)
    # TemporaryDirectory is a private mkdtemp folder (0700), removed after loading
    with tempfile.TemporaryDirectory(prefix="aift-tokenizer-") as tmp:
        folder = Path(tmp).resolve()
        for name, text in files.items():
            path = (folder / name).resolve()
            if path.parent != folder:  # the names are checked above; a path that leaves the folder is a bug
                raise RuntimeError(f"tokenizer file {name!r} resolves outside {folder}")
            path.write_text(text, encoding="utf-8")
        return load_tokenizer(folder)


def tokenizer_digest(files: dict[str, str]) -> str:
    sha = hashlib.sha256()
    for name in sorted(files):
        if name == "tokenizer.json":  # the vocabulary and merges; the config file carries paths and versions
            sha.update(files[name].encode())
    return sha.hexdigest()


# -- 4. prompts ---------------------------------------------------------------------------------------
class PromptEncoder:
    """Token ids of ``bos + template(note) + summary + eos`` and labels that score only the summary.

    The template's text around ``{text}`` is tokenized once, apart from the note, so the note can be cut to fit
    ``max_length`` token-exactly. The summary is cut to ``max_target_length`` first; then the note gives way.
    """

    def __init__(self, tokenizer, template: str, max_length: int, max_target_length: int):
        before, after = template.split("{text}")
        self.tokenizer = tokenizer
        self.before = tokenizer(before, add_special_tokens=False)["input_ids"]
        self.after = tokenizer(after, add_special_tokens=False)["input_ids"]
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self.eos = tokenizer.eos_token_id
        self.max_length = max_length
        self.max_target_length = max_target_length
        fixed = len(self.bos) + len(self.before) + len(self.after)
        if fixed + 1 + 1 >= max_length:
            raise DataError(f"data.max_length {max_length} leaves no room for the note: the prompt template alone takes "
                            f"{fixed} tokens; raise data.max_length or shorten data.prompt_template")
        self.fixed = fixed
        if self.generation_budget < 1:
            raise DataError(f"data.max_length {max_length} leaves no room for the note when a summary is generated: "
                            f"the prompt template takes {fixed} tokens and data.max_target_length {max_target_length}; "
                            f"valid: data.max_length > {fixed + max_target_length} or a smaller data.max_target_length")

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt(self, note_ids: list[int], budget: int) -> list[int]:
        return self.bos + self.before + note_ids[:budget] + self.after

    def generation_prompt(self, note_ids: list[int]) -> list[int]:
        """The prompt to generate a summary from: it leaves room for max_target_length summary tokens."""
        return self.prompt(note_ids, self.generation_budget)

    @property
    def generation_budget(self) -> int:
        return self.max_length - self.fixed - self.max_target_length

    def encode_note(self, note: str) -> dict[str, Any]:
        """A note alone (`aift predict`): its generation prompt and whether the note had to be cut."""
        note_ids = self._ids(note)
        return {"prompt_ids": self.generation_prompt(note_ids), "note_truncated": len(note_ids) > self.generation_budget}

    def encode(self, note: str, summary: str) -> dict[str, Any]:
        note_ids, target = self._ids(note), self._ids(summary) + [self.eos]
        summary_cut = len(target) > self.max_target_length
        target = target[: self.max_target_length]
        budget = self.max_length - self.fixed - len(target)
        prompt = self.prompt(note_ids, budget)
        return {
            "input_ids": prompt + target,
            "labels": [IGNORE_INDEX] * len(prompt) + target,
            # generation leaves room for a summary of max_target_length tokens, whatever this one's length
            "prompt_ids": self.generation_prompt(note_ids),
            "note_truncated": len(note_ids) > budget,
            "summary_truncated": summary_cut,
        }


def pack_rows(examples: list[dict[str, Any]], max_length: int) -> list[dict[str, list[int]]]:
    """Greedy packing in order: whole examples only, position ids restarting at each example."""
    rows, current = [], {"input_ids": [], "labels": [], "position_ids": []}
    for example in examples:
        length = len(example["input_ids"])
        if current["input_ids"] and len(current["input_ids"]) + length > max_length:
            rows.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += example["input_ids"]
        current["labels"] += example["labels"]
        current["position_ids"] += list(range(length))
    if current["input_ids"]:
        rows.append(current)
    return rows


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts for generation, padded on the left (so every row's next token comes at the end), and their mask."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    return ids, mask


class Collator:
    """Right-pads training rows (left-pads generation prompts) to the longest in the batch."""

    def __init__(self, pad_id: int, generation: bool):
        self.pad_id = pad_id
        self.generation = generation

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(r["input_ids"]) for r in rows)
        batch: dict[str, Any] = {}

        def right(key: str, fill: int) -> torch.Tensor:
            return torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in rows], dtype=torch.long)

        batch["input_ids"] = right("input_ids", self.pad_id)
        batch["labels"] = right("labels", IGNORE_INDEX)
        if "position_ids" in rows[0]:
            # padding continues as one more "sequence" of its own; it has no labels
            batch["position_ids"] = torch.tensor(
                [r["position_ids"] + list(range(width - len(r["position_ids"]))) for r in rows], dtype=torch.long)
        else:
            batch["attention_mask"] = torch.tensor(
                [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows], dtype=torch.long)
        batch["num_tokens"] = sum(len(r["input_ids"]) for r in rows)
        if self.generation:
            batch["prompt_ids"], batch["prompt_mask"] = left_padded([r["prompt_ids"] for r in rows], self.pad_id)
            batch["references"] = [r["reference"] for r in rows]
        return batch


# -- the DataModule -----------------------------------------------------------------------------------
class ClinicalNotesDataModule(L.LightningDataModule):

    MATCH_ON_RESUME = ("tokenizer_sha256",)  # a checkpoint is resumed and scored with its own tokenizer
    def __init__(self, root: str, splits: dict[str, str], text_field: str = "note", target_field: str = "summary",
                 prompt_template: str = "Notitie:\n{text}\n\nSamenvatting:\n", max_length: int = 256,
                 max_target_length: int = 64, packing: bool = False, deidentify: str = "none",
                 tokenizer_path: str | None = None, tokenizer_vocab_size: int = 1024, batch_size: int = 8,
                 num_workers: int = 0, on_invalid: str = "error",
                 max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES):
        super().__init__()
        self.root = Path(root)
        self.split_files = dict(splits)
        self.text_field, self.target_field = text_field, target_field
        self.prompt_template = prompt_template
        self.max_length, self.max_target_length = max_length, max_target_length
        self.packing = packing
        self.deidentify = deidentify
        self.tokenizer_path = tokenizer_path
        self.tokenizer_vocab_size = tokenizer_vocab_size
        self.batch_size, self.num_workers = batch_size, num_workers
        self.on_invalid = on_invalid
        self.invalid = InvalidRecords(on_invalid)
        self.max_record_bytes = max_record_bytes
        self.tokenizer = None
        self.tokenizer_source = None
        self.records: dict[str, list[tuple[int, str, str]]] = {}
        self.encoded: dict[str, list[dict[str, Any]]] = {}
        self.counts: dict[str, Counter] = {}
        self.tag_counts: Counter = Counter()
        self._digests: dict[str, str] = {}

    # -- the tokenizer a checkpoint was trained with (resume, eval) --
    def adopt_checkpoint(self, ckpt_path: str) -> None:
        from aifactory_train.recipe import load_checkpoint_state

        files = load_checkpoint_state(ckpt_path).get(TOKENIZER_CHECKPOINT_KEY)
        if not files:
            raise DataError(f"ckpt_path '{ckpt_path}' holds no tokenizer; it was not written by the clinical_notes recipe")
        self.tokenizer = tokenizer_from_files(files, f"ckpt_path '{ckpt_path}'")
        self.tokenizer_source = f"checkpoint {ckpt_path}"

    def has_split(self, name: str) -> bool:
        return name in self.split_files

    def _read(self, split: str) -> list[tuple[int, str, str]]:
        path = self.root / self.split_files[split]
        records = read_jsonl(path, split, self.text_field, self.target_field, self.max_record_bytes, self.invalid)
        self._digests[split] = digest_files(self.root, [self.split_files[split]], [split])
        return records

    def setup(self, stage: str | None = None) -> None:
        if self.records:
            return
        check_deidentified(self.root, self.deidentify)
        wanted = list(self.split_files) if stage in (None, "fit") else [s for s in self.split_files if s != "train"]
        for split in wanted:
            self.records[split] = self._read(split)
        self._check_shared_notes()
        self.invalid.log(log, self.root)
        if self.deidentify == "inline":
            from .deidentify import Deidentifier

            deidentifier = Deidentifier()
            for split, records in self.records.items():
                self.records[split] = [(line, deidentifier(note), deidentifier(summary))
                                       for line, note, summary in records]
            self.tag_counts = deidentifier.counts
            log.info("de-identified inline: %s", dict(sorted(deidentifier.counts.items())))
        if self.tokenizer is None:
            if self.tokenizer_path:
                self.tokenizer = load_tokenizer(self.tokenizer_path)
                self.tokenizer_source = f"pretrained {self.tokenizer_path}"
            else:
                if "train" not in self.records:
                    raise DataError("no tokenizer: train one on the train split (aift train) or load a checkpoint's")
                texts = [text for _, note, summary in self.records["train"] for text in (note, summary)]
                self.tokenizer = train_tokenizer(texts, self.tokenizer_vocab_size)
                self.tokenizer_source = f"BPE trained on {len(texts)} de-identified train texts"
        encoder = PromptEncoder(self.tokenizer, self.prompt_template, self.max_length, self.max_target_length)
        for split, records in self.records.items():
            self.encoded[split], self.counts[split] = self._encode(encoder, records)
            if self.counts[split]["note_truncated"]:
                log.warning("%s: %d of %d notes were longer than data.max_length=%d tokens allows and were truncated "
                            "(kept, not dropped)", split, self.counts[split]["note_truncated"], len(records),
                            self.max_length)

    def _check_shared_notes(self) -> None:
        """A note (by the SHA-256 of its text, held in memory: nothing is read again) that is also in an earlier
        split: the score on it measures memory. Left out of the later split under data.on_invalid=skip."""
        seen: dict[str, tuple[str, int]] = {}
        for split, records in self.records.items():
            here, kept = {}, []
            for line, note, summary in records:
                sha = hashlib.sha256(note.encode()).hexdigest()
                if sha in seen and seen[sha][0] != split:
                    earlier, earlier_line = seen[sha]
                    self.invalid("shared_across_splits", f"{self.root / self.split_files[split]}:{line}",
                                 f"{self.root / self.split_files[split]} line {line} (split '{split}'): the same note "
                                 f"as {self.root / self.split_files[earlier]} line {earlier_line} (split '{earlier}'); "
                                 f"expected each note in one split only")
                    continue
                here.setdefault(sha, (split, line))
                kept.append((line, note, summary))
            for sha, where in here.items():
                seen.setdefault(sha, where)
            if not kept:
                raise DataError(f"data.splits.{split}: no records left after data.on_invalid=skip left out "
                                f"{len(self.invalid)}: {self.invalid_records}")
            self.records[split] = kept

    @property
    def invalid_records(self) -> dict[str, dict[str, Any]]:
        """``{reason: {count, first_paths, first_message}}`` of the records data.on_invalid=skip left out (paths
        are ``file:line``; never the text)."""
        return self.invalid.by_reason

    def _encode(self, encoder: PromptEncoder, records) -> tuple[list[dict[str, Any]], Counter]:
        from datasets import Dataset, disable_progress_bars

        disable_progress_bars()  # a "Map" bar per split is noise in the run's log
        table = Dataset.from_dict({"line": [r[0] for r in records], "note": [r[1] for r in records],
                                   "summary": [r[2] for r in records]})
        encoded = table.map(lambda row: {**encoder.encode(row["note"], row["summary"]), "reference": row["summary"]},
                            remove_columns=["note", "summary"], keep_in_memory=True)
        rows = encoded.to_list()
        counts = Counter(note_truncated=sum(r["note_truncated"] for r in rows),
                         summary_truncated=sum(r["summary_truncated"] for r in rows), records=len(rows),
                         tokens=sum(len(r["input_ids"]) for r in rows))
        return rows, counts

    @property
    def data_info(self) -> dict[str, Any]:
        files = tokenizer_files(self.tokenizer)
        return {
            "vocab_size": len(self.tokenizer),
            "pad_token_id": self.tokenizer.pad_token_id,
            "bos_token_id": self.tokenizer.bos_token_id,
            "eos_token_id": self.tokenizer.eos_token_id,
            "tokenizer_sha256": tokenizer_digest(files),
            "max_length": self.max_length,
            "max_target_length": self.max_target_length,
            "prompt_template": self.prompt_template,
        }

    def lineage(self) -> DatasetLineage:
        from datasets import Dataset

        lineage = DatasetLineage(name="clinical_notes", root=str(self.root), datacard=read_datacard(self.root),
                                 skipped_files=list(self.invalid.paths), invalid_records=self.invalid_records)
        extra = {}
        for split, rows in self.encoded.items():
            # MLflow's dataset input gets a schema and row count only: line numbers and token counts, no text
            meta = Dataset.from_dict({"line": [r["line"] for r in rows],
                                      "tokens": [len(r["input_ids"]) for r in rows]})
            lineage.splits[split] = SplitLineage(name=split, num_rows=len(rows), digest=self._digests[split],
                                                 dataset=meta)
            extra.update({f"{key}_{split}": str(value) for key, value in self.counts[split].items()})
        extra.update({f"deidentified_inline_{tag}": str(n) for tag, n in sorted(self.tag_counts.items())})
        extra["tokenizer"] = self.tokenizer_source or ""
        extra.update(self.invalid.lineage_fields())
        lineage.datacard = {**lineage.datacard, **extra}
        return lineage

    # -- loaders --
    def _rows(self, split: str, train: bool) -> list[dict[str, Any]]:
        rows = self.encoded[split]
        if train and self.packing:
            return pack_rows(rows, self.max_length)
        keep = ("input_ids", "labels") if train else ("input_ids", "labels", "prompt_ids", "reference")
        return [{k: r[k] for k in keep} for r in rows]

    def _loader(self, split: str, train: bool) -> DataLoader:
        rows = self._rows(split, train)
        return DataLoader(rows, batch_size=self.batch_size, sampler=shuffled(rows, self.trainer) if train else None,
                          num_workers=self.num_workers, collate_fn=Collator(self.tokenizer.pad_token_id, not train),
                          persistent_workers=self.num_workers > 0, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
