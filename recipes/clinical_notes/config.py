"""The typed schema of clinical_notes' config (configs/recipe, configs/data, configs/model)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from aifactory_train.recipe import (ExportOptions, OptimConfig, PredictOptions, RunConfig, check, check_choice,
                                   missing_data_root)
from aifactory_train.recipe import DataError

DEIDENTIFY_MODES = ("none", "inline")
ON_INVALID = ("error", "skip")  # as aifactory_train.records.lineage.ON_INVALID (not imported: keeps this module light)
FINETUNE_MODES = ("full", "lora")
MISSING_SPLIT = ("data.splits.{split}: '{path}' does not exist; make demo data with "
                 "`aift data synth clinical_notes --out DIR` or point data.root at your JSONL files")


def check_deidentified(root: str | Path, deidentify: str) -> None:
    """Train only on notes marked de-identified by their data card, or de-identified here (deidentify=inline)."""
    from aifactory_train.recipe import read_datacard

    card = read_datacard(root)
    if deidentify == "inline" or card.get("deidentified", "").lower() == "true":
        return
    raise DataError(
        f"data.root '{root}' is not marked de-identified (its datacard.yaml has deidentified: "
        f"{card.get('deidentified', 'missing')}); this recipe trains only on de-identified notes. Run "
        f"`aift data deidentify recipe=clinical_notes data.root={root} --out DIR` and train with "
        f"data.root=DIR, or set data.deidentify=inline")


def check_data_files(root: str | Path, splits: Dict[str, str], deidentify: str) -> None:
    """Every configured split file is there and the notes may be trained on (before a job starts or is queued;
    data.py checks again when it reads, record by record)."""
    root = Path(root)
    if not root.is_dir():
        raise missing_data_root(root, "clinical_notes", deidentify=True)
    for split, name in splits.items():
        if not (root / name).is_file():
            raise DataError(MISSING_SPLIT.format(split=split, path=root / name))
    check_deidentified(root, deidentify)


@dataclass
class DataConfig:
    _target_: str = f"{__package__}.data.ClinicalNotesDataModule"  # this package's, also in a copy
    root: str = "data/clinical_notes"
    splits: Dict[str, str] = field(default_factory=dict)
    text_field: str = "note"
    target_field: str = "summary"
    prompt_template: str = "Notitie:\n{text}\n\nSamenvatting:\n"
    max_length: int = 256
    max_target_length: int = 64
    packing: bool = False
    deidentify: str = "none"
    tokenizer_path: Optional[str] = None
    tokenizer_vocab_size: int = 1024
    batch_size: int = 8
    num_workers: int = 0
    on_invalid: str = "error"
    max_record_bytes: int = 1 << 20

    def check(self) -> None:
        check_choice("data.on_invalid", self.on_invalid, ON_INVALID)
        check(self.max_record_bytes >= 1024, "data.max_record_bytes", self.max_record_bytes,
              "an integer >= 1024 (bytes of one JSONL line)")
        check({"train", "val"} <= set(self.splits), "data.splits", dict(self.splits),
              "a mapping with at least 'train' and 'val' JSONL files, relative to data.root")
        check(self.text_field != self.target_field, "data.target_field", self.target_field,
              f"a field other than data.text_field ('{self.text_field}')")
        check(self.prompt_template.count("{text}") == 1, "data.prompt_template", self.prompt_template,
              "a template with exactly one '{text}' placeholder where the note goes")
        check(self.max_length >= 16, "data.max_length", self.max_length, "an integer >= 16 (tokens)")
        check(1 <= self.max_target_length < self.max_length, "data.max_target_length", self.max_target_length,
              f"an integer in [1, data.max_length={self.max_length}) (summary tokens)")
        check_choice("data.deidentify", self.deidentify, DEIDENTIFY_MODES)
        check(self.tokenizer_vocab_size >= 300, "data.tokenizer_vocab_size", self.tokenizer_vocab_size,
              "an integer >= 300 (the 256 byte symbols + special tokens + merges)")
        check(self.batch_size >= 1, "data.batch_size", self.batch_size, "an integer >= 1")
        check(self.num_workers >= 0, "data.num_workers", self.num_workers, "an integer >= 0")

    def check_files(self, stage: str = "fit") -> None:
        splits = {k: v for k, v in self.splits.items() if stage == "fit" or k != "train"}  # eval: no train split
        check_data_files(self.root, splits, self.deidentify)


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])

    def check(self) -> None:
        check(self.r >= 1, "model.lora.r", self.r, "an integer >= 1")
        check(0 <= self.dropout < 1, "model.lora.dropout", self.dropout, "a number in [0, 1)")
        check(len(self.target_modules) >= 1, "model.lora.target_modules", self.target_modules,
              "one or more module names, e.g. [q_proj, v_proj]")


@dataclass
class ModelConfig:
    task: str = "causal_lm"
    name: str = "llama_tiny"
    # An HF folder (config.json + safetensors + tokenizer files) on local disk; null: build from the sizes below.
    pretrained_path: Optional[str] = None
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: Optional[int] = None
    intermediate_size: int = 172
    vocab_size: Optional[int] = None  # null: the tokenizer's size rounded up to a multiple of 64
    max_position_embeddings: int = 2048
    finetune: str = "full"
    lora: LoraConfig = field(default_factory=LoraConfig)
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    compile: bool = False

    def check(self) -> None:
        check_choice("model.finetune", self.finetune, FINETUNE_MODES)
        check_choice("model.attn_implementation", self.attn_implementation, ("sdpa", "eager", "flash_attention_2"))
        if self.pretrained_path is not None:
            path = Path(self.pretrained_path)
            check(path.is_dir(), "model.pretrained_path", self.pretrained_path,
                  "an existing local folder in Hugging Face layout (config.json, *.safetensors, tokenizer files); "
                  "nothing is downloaded")
            check((path / "config.json").is_file(), "model.pretrained_path", self.pretrained_path,
                  "a folder with config.json (save_pretrained layout); this folder has none")
        else:
            check(self.hidden_size % self.num_heads == 0, "model.hidden_size", self.hidden_size,
                  f"a multiple of model.num_heads ({self.num_heads})")
            kv = self.num_kv_heads or self.num_heads
            check(self.num_heads % kv == 0, "model.num_kv_heads", self.num_kv_heads,
                  f"null or a divisor of model.num_heads ({self.num_heads})")


@dataclass
class LossConfig:
    """Cross-entropy on the summary tokens only; nothing to configure yet."""


@dataclass
class NotesPredictOptions(PredictOptions):
    # the notes are read as the eval split is (recipe config: predict.text_field=${data.text_field}, ...)
    text_field: str = "note"  # the JSONL field that holds the note
    deidentify: str = "none"  # none: the input's data card must say deidentified: true | inline: deduce first

    def check(self) -> None:
        super().check()
        check(self.deidentify in DEIDENTIFY_MODES, "predict.deidentify", self.deidentify,
              f"{' or '.join(DEIDENTIFY_MODES)} (it follows data.deidentify unless set)")


@dataclass
class NotesExportOptions(ExportOptions):
    merge_lora: bool = True  # format=hf: merge LoRA adapters into the weights; false keeps a peft adapter folder


@dataclass
class ClinicalNotesConfig(RunConfig):
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    predict: NotesPredictOptions = field(default_factory=NotesPredictOptions)
    export: NotesExportOptions = field(default_factory=NotesExportOptions)

    def check(self) -> None:
        if self.model.pretrained_path is None:
            check(self.data.max_length <= self.model.max_position_embeddings, "data.max_length", self.data.max_length,
                  f"at most model.max_position_embeddings ({self.model.max_position_embeddings})")
