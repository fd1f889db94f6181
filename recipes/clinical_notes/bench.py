"""The benchmark adapter of this recipe (``aift bench recipes``, benchmarks/recipe_step.py): causal-LM
fine-tuning of a Llama built from config, AdamW (fused on GPU), clipping at 1, loss on the last quarter of each
row (the summary), SDPA; full rows of ``seq_len`` tokens, as packing gives. The same model and batch in the
recipe's Lightning step and in a plain PyTorch loop (``BenchAdapter`` in aifactory_train/recipe.py)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from aifactory_train.recipe import BENCH_OPTIM, model_config

METRICS = {
    "ratio": ("recipe/plain tokens/s", False),
    "samples_per_s": ("recipe rows/s", False),
    "tokens_per_s": ("recipe tokens/s", False),
    "mfu": ("recipe model FLOP/s / peak", True),
    "joules_per_sample": ("GPU energy / rows", True),
    "samples_per_s_per_watt": ("performance per watt: rows / GPU energy", True),
    "joules_per_1k_tokens": ("GPU energy / 1k tokens", True),
    "data_wait_fraction": ("share of step time waiting for data (real files)", False),
}
# benchmarks/recipe_step.py's defaults. 16 x 512 tokens: a ~0.3 s CPU step. At 8 x 256 (65 ms) Lightning's own
# fixed cost per step, ~3 ms on 2 cores (a bare LightningModule with the plain loop's training step measured the
# same), is 5 % of the step.
DEFAULTS = {"model": "llama_tiny", "batch_size": 16, "image_size": None, "seq_len": 512, "steps": 15}


def settings(gpu: bool, quick: bool) -> dict:
    if gpu:
        return dict(model="llama_374m", batch_size=8, seq_len=2048, image_size=None, warmup=5, split_steps=20)
    return dict(model="llama_tiny", batch_size=8 if quick else 16, seq_len=256 if quick else 512, image_size=None,
                warmup=3, split_steps=10)


def build(args, device):
    return Bench(args, device)


class Bench:
    optim = {**BENCH_OPTIM, "lr": 0.003, "weight_decay": 0.01}
    clip = 1.0
    fused_adamw = True  # on GPU, as the recipe's configure_optimizers

    def __init__(self, args, device):
        self.args, self.device = args, device
        self.model_cfg = model_config(args.model)
        vocab = self.model_cfg.get("vocab_size") or 1024
        length = args.seq_len
        self.tokens_per_sample = length
        self.data_info = {"vocab_size": vocab, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                          "tokenizer_sha256": "", "max_length": length, "max_target_length": length // 4,
                          "prompt_template": "{text}"}
        gen = torch.Generator().manual_seed(0)
        self.batches = []
        for _ in range(4):
            ids = torch.randint(3, vocab, (args.batch_size, length), generator=gen)
            labels = ids.clone()
            labels[:, : length - length // 4] = -100
            self.batches.append({"input_ids": ids.to(device), "labels": labels.to(device),
                                 "num_tokens": args.batch_size * length})

    def _model_cfg(self):
        return {**self.model_cfg, "compile": self.args._compile}

    def module(self):
        from .module import ClinicalNotesModule

        return ClinicalNotesModule(model=self._model_cfg(), optim=self.optim, loss={}, data_info=self.data_info), self.clip

    def plain(self):
        from .model import build_model

        net = build_model(self._model_cfg(), self.data_info).to(self.device).train()
        if self.args._compile:
            net.compile()

        def step(batch):
            return net(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss

        return net, step, self.clip

    def datamodule(self, workers: int):
        """The recipe's DataModule on synthetic notes written as JSONL (tagged variant: already de-identified)."""
        from .data import ClinicalNotesDataModule
        from .synth import synthesize

        root = synthesize(Path(tempfile.mkdtemp()) / "notes", size=max(self.args.batch_size * 12, 200), seed=0,
                          variant="tagged")
        return ClinicalNotesDataModule(root=str(root), splits={"train": "train.jsonl", "val": "val.jsonl"},
                                       max_length=self.args.seq_len, max_target_length=min(64, self.args.seq_len // 4),
                                       packing=True, tokenizer_vocab_size=min(1024, self.data_info["vocab_size"]),
                                       batch_size=self.args.batch_size, num_workers=workers)

    def input_pipeline(self, workers: int) -> dict:
        """Packed rows/s from the DataModule, and de-identification notes/s (deduce, when installed)."""
        dm = self.datamodule(workers)
        dm.setup("fit")
        loader = dm.train_dataloader()
        rates = []
        for _ in range(2):
            start, rows = time.perf_counter(), 0
            for batch in loader:
                rows += batch["input_ids"].shape[0]
            rates.append(rows / (time.perf_counter() - start))
        result = {"workers": workers, "samples_per_s": rates[-1], "files": len(dm.records["train"])}
        try:
            from .deidentify import Deidentifier
            from .synth import generate_records

            deidentifier = Deidentifier()
            notes = [r["note"] for r in generate_records(500, seed=1)]
            start = time.perf_counter()
            for note in notes:
                deidentifier(note)
            result["deidentify_notes_per_s"] = len(notes) / (time.perf_counter() - start)
        except Exception as err:  # noqa: BLE001 - deduce is optional for this benchmark
            result["deidentify_notes_per_s"] = None
            result["deidentify_skipped"] = str(err)
        return result
