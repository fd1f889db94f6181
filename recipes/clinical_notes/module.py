"""clinical_notes LightningModule: supervised fine-tuning of a causal LM on (note -> summary) pairs.

Loss on the summary tokens only (labels are -100 on the prompt); validation and test report the token-weighted
loss, perplexity and ROUGE-L of greedy summaries (torchmetrics). Generated text stays in memory: it is written
to ``reports/samples_<split>.jsonl`` only when ``recipe.module.log_samples`` > 0 says so. The tokenizer travels
inside every checkpoint, so `aift eval`, `aift export` and resume use exactly the one the model was trained with.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torchmetrics import MeanMetric
from torchmetrics.text import ROUGEScore

from aifactory_train.recipe import ConfigError
from .data import (IGNORE_INDEX, TOKENIZER_CHECKPOINT_KEY, Collator, check_tokenizer_files, left_padded,
                   tokenizer_files, tokenizer_from_files)
from .model import build_model
from aifactory_train.recipe import build_optimizer, planned_optimizer_steps, spread_indices, warmup_cosine

log = logging.getLogger(__name__)


def normalize_for_rouge(text: str) -> str:
    """torchmetrics' default keeps only [a-z0-9] and would drop Dutch letters such as ë; keep every word character."""
    return re.sub(r"[^\w]+", " ", text.lower())


class ClinicalNotesModule(L.LightningModule):
    def __init__(self, model: dict[str, Any], optim: dict[str, Any], loss: dict[str, Any], data_info: dict[str, Any],
                 max_new_tokens: int = 64, rouge_max_batches: int = 4, log_samples: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.net = build_model(model, data_info)
        self.tokenizer = None
        self.tokenizer_files: dict[str, str] | None = None
        self.flops_per_token: int | None = None
        self.nll = torch.nn.ModuleDict({split: MeanMetric() for split in ("val", "test")})
        self.rouge = torch.nn.ModuleDict({split: ROUGEScore(rouge_keys="rougeL", normalizer=normalize_for_rouge)
                                          for split in ("val", "test")})
        self._samples: list[dict[str, str]] = []

    # -- set-up ----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and datamodule.tokenizer is not None:
            self.tokenizer = datamodule.tokenizer
            self.tokenizer_files = tokenizer_files(self.tokenizer)
        if stage != "fit":
            return
        if self.hparams.model.get("gradient_checkpointing"):
            self.net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.flops_per_token is None:
            self.flops_per_token = self.measure_flops_per_token()
        if self.hparams.model.get("compile"):
            self.net.compile()  # in place: state_dict keys stay the same

    def measure_flops_per_token(self) -> int:
        """Training FLOPs (forward + backward) per token at data.max_length, counted on the meta device."""
        from lightning.fabric.utilities.throughput import measure_flops

        length = self.hparams.data_info["max_length"]
        with torch.device("meta"):
            net = build_model(self.hparams.model, self.hparams.data_info, load_weights=False)
            ids = torch.zeros(1, length, dtype=torch.long)
        return measure_flops(net, lambda: net(input_ids=ids).logits, loss_fn=torch.Tensor.sum) // length

    def on_fit_start(self) -> None:
        if self.trainer.is_global_zero and self.tokenizer is not None:
            self.tokenizer.save_pretrained(Path(self.trainer.default_root_dir) / "tokenizer")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[TOKENIZER_CHECKPOINT_KEY] = self.tokenizer_files

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        files = checkpoint.get(TOKENIZER_CHECKPOINT_KEY)
        # checked on load, before predict or export would write the files (load_trained_module names the file)
        self.tokenizer_files = check_tokenizer_files(files, "the checkpoint") if files else None

    # -- steps -----------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        # use_cache=False: no KV cache to build in training, and transformers looks for packed rows (restarting
        # position ids) only when there is none; with a cache, packed examples would attend to each other.
        return self.net(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                        position_ids=batch.get("position_ids"), labels=batch["labels"], use_cache=False).loss

    @staticmethod
    def tokens_in_batch(batch: dict[str, Any]) -> int:
        """Real (non-padding) tokens, for TrainingThroughput's tokens/s and FLOP/s."""
        return int(batch["num_tokens"])

    def training_step(self, batch, batch_idx):
        loss = self(batch)
        # self.log costs ~1 ms of Python per call, which is 2 % of a small model's CPU step; the logger writes step
        # values only every trainer.log_every_n_steps anyway, so only log then (Lightning's own test, private).
        connector = getattr(self.trainer, "_logger_connector", None)
        if connector is None or connector.should_update_logs:
            self.log("train/loss", loss, batch_size=batch["input_ids"].shape[0])
        return loss

    def _eval_step(self, batch, split: str, batch_idx: int) -> None:
        loss = self(batch)
        scored = (batch["labels"][:, 1:] != -100).sum()  # the model shifts labels by one
        self.nll[split].update(loss.detach(), weight=scored)
        if batch_idx >= self.hparams.rouge_max_batches:
            return
        generated = self.generate(batch["prompt_ids"], batch["prompt_mask"])
        self.rouge[split].update(generated, batch["references"])
        wanted = self.hparams.log_samples - len(self._samples)
        for text, reference in list(zip(generated, batch["references"]))[: max(0, wanted)]:
            self._samples.append({"generated": text, "reference": reference})

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val", batch_idx)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test", batch_idx)

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[str]:
        """Greedy summaries (text) for left-padded prompts."""
        info = self.hparams.data_info
        output = self.net.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=False,
                                   max_new_tokens=self.hparams.max_new_tokens, pad_token_id=info["pad_token_id"],
                                   eos_token_id=info["eos_token_id"])
        return self.tokenizer.batch_decode(output[:, prompt_ids.shape[1]:], skip_special_tokens=True)

    def _end_eval(self, split: str) -> None:
        if self.trainer.sanity_checking:
            self.nll[split].reset()
            self.rouge[split].reset()
            self._samples.clear()
            return
        nll = self.nll[split].compute()
        self.log(f"{split}/loss", nll, sync_dist=False)  # MeanMetric already reduced over ranks
        self.log(f"{split}/perplexity", torch.exp(nll.clamp(max=30)))
        if self.hparams.rouge_max_batches > 0:
            self.log(f"{split}/rougeL", self.rouge[split].compute()["rougeL_fmeasure"])
        self.nll[split].reset()
        self.rouge[split].reset()
        if self._samples and self.trainer.is_global_zero:
            reports = Path(self.trainer.default_root_dir) / "reports"
            reports.mkdir(parents=True, exist_ok=True)
            lines = [json.dumps(s, ensure_ascii=False) for s in self._samples]
            (reports / f"samples_{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        self._samples.clear()

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")

    # -- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self):
        cfg = self.hparams.optim
        params = [p for p in self.parameters() if p.requires_grad]  # with LoRA: the adapters only
        optimizer = build_optimizer(params, cfg, {"adamw": {"fused": self.device.type == "cuda"}})
        scheduler = warmup_cosine(optimizer, lambda: planned_optimizer_steps(self.trainer), cfg["warmup_steps"],
                                  cfg["min_lr_ratio"])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- predict ---------------------------------------------------------------------------------
    PREDICT_EXTENSIONS = (".jsonl",)  # the kinds of file `aift predict` reads
    PREDICT_DRAWS = False  # predict.draw=true is refused

    def predict_files(self, files: list[Path], batch_size: int, options: dict[str, Any]):
        """One dict per note (a JSONL line): ``file``, ``line``, the greedy ``summary`` and ``note_truncated``."""
        from .predict import predict_files

        return predict_files(self, files, batch_size, options)

    # -- export ----------------------------------------------------------------------------------
    EXPORT_FORMATS = ("hf",)  # the format= values of `aift export`

    def export_model(self, fmt: str, out_dir: Path, options: dict[str, Any]) -> list[Path]:
        """``format=hf``: a folder that AutoModelForCausalLM / AutoTokenizer.from_pretrained load.

        LoRA runs: ``export.merge_lora=true`` (default) merges the adapters into the weights; ``false`` keeps
        them as a peft adapter folder whose adapter_config names its base (the pretrained folder, or the base
        weights written next to it for a model built from config).
        """
        if fmt != "hf":
            raise ConfigError(f"config key 'format': clinical_notes exports 'hf', not '{fmt}'")
        if not self.tokenizer_files:
            raise ConfigError("ckpt_path: this checkpoint holds no tokenizer; it was not written by clinical_notes")
        tokenizer = tokenizer_from_files(self.tokenizer_files)
        net = self.net.cpu().eval()
        target = Path(out_dir) / "model"
        written = [target]
        if self.hparams.model["finetune"] != "lora":
            net.save_pretrained(target)
        elif options.get("merge_lora", True):
            copy.deepcopy(net).merge_and_unload().save_pretrained(target)
        else:
            base = self.hparams.model.get("pretrained_path")
            if base is None:
                base_dir = Path(out_dir) / "base"
                copy.deepcopy(net).unload().save_pretrained(base_dir)
                tokenizer.save_pretrained(base_dir)
                base = str(base_dir.resolve())
                written.append(base_dir)
            net.peft_config["default"].base_model_name_or_path = str(base)
            net.save_pretrained(target)
        tokenizer.save_pretrained(target)
        info = self.hparams.data_info
        (target / "aift_prompt.json").write_text(json.dumps(
            {"prompt_template": info.get("prompt_template"), "max_length": info["max_length"],
             "max_new_tokens": self.hparams.max_new_tokens,
             "usage": "tokenizer(prompt_template.format(text=note)) -> model.generate(..., do_sample=False)"},
            indent=2) + "\n")
        return sorted(p for folder in written for p in folder.rglob("*") if p.is_file())

    # -- what `aift export` checks (ChecksExport, ScoresRecords, ShowsMemorisation) ---------------
    def _tokenizer(self):
        if self.tokenizer is None and self.tokenizer_files:
            self.tokenizer = tokenizer_from_files(self.tokenizer_files)
        return self.tokenizer

    def parity_inputs(self, datamodule, split: str, count: int) -> dict[str, Any]:
        """``count`` records of ``split`` as training encodes them (prompt + summary), and their note texts (the
        exported tokenizer must encode them as the checkpoint's does)."""
        rows = datamodule.encoded[split][:count]
        batch = Collator(self.hparams.data_info["pad_token_id"], generation=False)(rows)
        notes = [note for _, note, _ in datamodule.records[split][:count]]
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "notes": notes}

    @staticmethod
    def _logits(net, inputs: dict[str, Any]):
        with torch.no_grad():
            logits = net(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False).logits
        return (logits.float() * inputs["attention_mask"][..., None]).numpy()  # padding's logits mean nothing

    @staticmethod
    def _token_ids(tokenizer, notes: list[str]):
        import numpy as np

        ids = [tokenizer(note)["input_ids"] for note in notes]
        width = max(len(i) for i in ids)
        return np.array([i + [-1] * (width - len(i)) for i in ids])

    def reference_outputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {"logits": self._logits(self.net.cpu().float().eval(), inputs),
                "token_ids": self._token_ids(self._tokenizer(), inputs["notes"])}

    def exported_outputs(self, files: list[Path], inputs: dict[str, Any]) -> dict[str, Any]:
        """The written folder loaded as a user would: transformers (and peft for an adapter folder)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = next(Path(f).parent for f in files if Path(f).name in ("config.json", "adapter_config.json")
                      and Path(f).parent.name == "model")
        if (folder / "adapter_config.json").is_file():
            from peft import AutoPeftModelForCausalLM

            net = AutoPeftModelForCausalLM.from_pretrained(folder)
        else:
            net = AutoModelForCausalLM.from_pretrained(folder)
        return {"logits": self._logits(net.float().eval(), inputs),
                "token_ids": self._token_ids(AutoTokenizer.from_pretrained(folder), inputs["notes"])}

    @torch.no_grad()
    def per_record_losses(self, datamodule, split: str, limit: int) -> list[float]:
        """Each record's mean cross-entropy over its summary tokens (what training minimised)."""
        rows = [datamodule.encoded[split][i] for i in spread_indices(len(datamodule.encoded[split]), limit)]
        collate = Collator(self.hparams.data_info["pad_token_id"], generation=False)
        net = self.net.cpu().float().eval()
        losses = []
        for start in range(0, len(rows), 16):
            batch = collate(rows[start:start + 16])
            logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            labels = batch["labels"][:, 1:]
            token_losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                             ignore_index=IGNORE_INDEX, reduction="none")
            scored = (labels != IGNORE_INDEX).float()
            losses += ((token_losses.view_as(scored) * scored).sum(1) / scored.sum(1).clamp(min=1)).tolist()
        return losses

    @torch.no_grad()
    def verbatim_fractions(self, datamodule, split: str, limit: int) -> list[float]:
        """Per record: prompted with its training prompt, the share of its summary tokens the greedy continuation
        returns verbatim from the start (the longest common prefix, over the summary's length)."""
        info = self.hparams.data_info
        net = self.net.cpu().float().eval()
        rows = [datamodule.encoded[split][i] for i in spread_indices(len(datamodule.encoded[split]), limit)]
        fractions = []
        for start in range(0, len(rows), 16):
            chunk = rows[start:start + 16]
            targets = [[t for t in r["labels"] if t != IGNORE_INDEX] for r in chunk]
            prompts = [r["input_ids"][:len(r["input_ids"]) - len(t)] for r, t in zip(chunk, targets)]
            ids, mask = left_padded(prompts, info["pad_token_id"])
            out = net.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                               max_new_tokens=max(len(t) for t in targets), pad_token_id=info["pad_token_id"],
                               eos_token_id=info["eos_token_id"])[:, ids.shape[1]:].tolist()
            for generated, target in zip(out, targets):
                same = 0
                while same < min(len(generated), len(target)) and generated[same] == target[same]:
                    same += 1
                fractions.append(same / max(1, len(target)))
        return fractions

    def vocabulary(self) -> list[str]:
        """The tokenizer's entries as text (byte-level BPE pieces decoded), special tokens left out."""
        tokenizer = self._tokenizer()
        special = set(tokenizer.all_special_ids)
        return [tokenizer.decode([i]) for i in range(len(tokenizer)) if i not in special]

    def record_texts(self, datamodule, split: str) -> list[str]:
        return [f"{note}\n{summary}" for _, note, summary in datamodule.records[split]]

