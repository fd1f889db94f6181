"""A recipe's Lightning training step vs a hand-written PyTorch loop, and the input pipeline on real files.

Both loops run in this one process on the same model, batch, precision and in-memory data, alternating
(plain, recipe, plain, recipe, ...) so that machine noise hits both; the medians are compared. The recipe
side is the real LightningModule of the recipe in a `lightning.Trainer` (with the recipe's throughput callback
and gradient clipping; no logger or checkpointing, which the plain loop does not have either).

    python benchmarks/recipe_step.py plastic_sorting                      # CPU: resnet18, 64 px, batch 32
    python benchmarks/recipe_step.py crop_detection                       # CPU: Faster R-CNN MobileNetV3 320, batch 4
    python benchmarks/recipe_step.py plastic_sorting --model resnet50 --image-size 224 --batch-size 256 \
        --steps 40 --compile both                                          # one GPU
    python benchmarks/recipe_step.py crop_detection --model fasterrcnn_resnet50_fpn_v2 --image-size 640 \
        --batch-size 16 --steps 20                                         # one GPU
    python benchmarks/recipe_step.py clinical_notes                       # CPU: llama_tiny, 512 tokens, batch 16
    python benchmarks/recipe_step.py clinical_notes --model llama_374m --seq-len 2048 --batch-size 8 \
        --steps 20 --compile both                                          # one GPU (reference: 132k tok/s compiled)
Writes a JSON (and a Markdown table with --markdown) with the exact command. crop_detection and plastic_sorting
also measure the exported ONNX model's CPU latency at batch 1 (onnxruntime).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

OPTIM = {"name": "adamw", "lr": 0.002, "weight_decay": 0.05, "momentum": 0.9, "warmup_steps": 20, "min_lr_ratio": 0.01}


def device_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class PlasticSorting:
    """Image classification: torchvision classifier, AdamW, label smoothing, channels_last on GPU."""

    defaults = {"model": "resnet18", "batch_size": 32, "image_size": 64, "steps": 20}
    classes = 7

    def __init__(self, args, device):
        self.args, self.device = args, device
        gen = torch.Generator().manual_seed(0)
        self.batches = [
            (torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen).to(device),
             torch.randint(0, self.classes, (args.batch_size,), generator=gen).to(device))
            for _ in range(8)
        ]

    def module(self):
        from aifactory_train.recipes.plastic_sorting.module import PlasticSortingModule

        model = {"name": self.args.model, "weights_path": None, "channels_last": "auto", "compile": self.args._compile}
        info = {"class_names": [f"c{i}" for i in range(self.classes)], "channels": ["r", "g", "b"],
                "image_size": self.args.image_size, "mean": [0.5] * 3, "std": [0.25] * 3}
        return PlasticSortingModule(model=model, optim=OPTIM, loss={"label_smoothing": 0.1}, data_info=info), None

    def plain(self):
        """(parameters, step function) of the hand-written loop: the same model, loss, autocast as the recipe."""
        from aifactory_train.run.models import build_torchvision_classifier

        net = build_torchvision_classifier(self.args.model, self.classes).to(self.device)
        channels_last = self.device.type == "cuda"
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        if self.args._compile:
            net.compile()
        net.train()

        def step(batch):
            images, labels = batch
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            return F.cross_entropy(net(images), labels, label_smoothing=0.1)

        return net, step, None

    def datamodule(self, workers: int):
        """The recipe's DataModule on freshly synthesised real files (12 batches' worth)."""
        from aifactory_train.recipes.plastic_sorting.data import PlasticSortingDataModule
        from aifactory_train.recipes.plastic_sorting.synth import synthesize

        root = synthesize(Path(tempfile.mkdtemp()) / "plastic", size=max(self.args.batch_size * 12, 560), seed=0)
        return PlasticSortingDataModule(root=str(root), image_size=self.args.image_size, batch_size=self.args.batch_size,
                                        num_workers=workers, verify_files=False)

    def input_pipeline(self, workers: int) -> dict:
        return _time_loader(self.datamodule(workers), workers)

    def onnx_latency(self) -> dict:
        """CPU latency at batch 1 of the exported model (onnxruntime) and of the same model in eager PyTorch."""
        from aifactory_train.recipes.plastic_sorting.export import DeployableClassifier, export_onnx
        from aifactory_train.records.telemetry import import_onnxruntime

        onnxruntime = import_onnxruntime()

        module, _ = self.module()
        out = Path(tempfile.mkdtemp())
        export_onnx(module, out)
        session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        image = torch.rand(1, 3, self.args.image_size, self.args.image_size)
        eager = DeployableClassifier(module.net.eval().cpu(), [0.5] * 3, [0.25] * 3).eval()
        return {"input_hw": list(image.shape[2:]), "threads": torch.get_num_threads(),
                "onnxruntime_ms": _median_ms(lambda: session.run(None, {"image": image.numpy()})),
                "pytorch_eager_ms": _median_ms(lambda: eager(image))}


def _median_ms(run, warmup: int = 3, repeats: int = 20) -> float:
    import numpy as np

    with torch.no_grad():
        for _ in range(warmup):
            run()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


class CropDetection:
    """Object detection: torchvision detector, AdamW, gradient clipping at 10 (the recipe's defaults)."""

    defaults = {"model": "fasterrcnn_mobilenet_v3_large_320_fpn", "batch_size": 4, "image_size": 256, "steps": 10}
    optim = {**OPTIM, "lr": 0.001, "weight_decay": 0.0001}
    clip = 10.0

    def __init__(self, args, device):
        import numpy as np

        from aifactory_train.recipes.crop_detection.synth import make_image

        self.args, self.device = args, device
        rng = np.random.default_rng(0)
        self.batches = []
        for _ in range(4):
            images, targets = [], []
            for _ in range(args.batch_size):
                pixels, objects = make_image(rng, args.image_size)
                images.append(torch.from_numpy(pixels).permute(2, 0, 1).float().div(255).to(device))
                boxes = torch.tensor([[x, y, x + w, y + h] for _, (x, y, w, h) in objects], dtype=torch.float32).reshape(-1, 4)
                labels = torch.tensor([1 if c == 3 else 2 for c, _ in objects], dtype=torch.int64)
                targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
            self.batches.append((images, targets))
        from omegaconf import OmegaConf

        from aifactory_train.locations import config_dir

        self.model_cfg = OmegaConf.to_container(OmegaConf.load(config_dir() / "model" / f"{args.model}.yaml"))

    @property
    def channels_last(self) -> bool:
        """--channels-last auto|true|false (default false, as the model configs)."""
        setting = getattr(self.args, "channels_last", None) or "false"
        return self.device.type == "cuda" if setting == "auto" else setting == "true"

    def module(self):
        from aifactory_train.recipes.crop_detection.module import CropDetectionModule

        model = {**self.model_cfg, "channels_last": self.channels_last, "compile_backbone": self.args._compile}
        module = CropDetectionModule(model=model, optim=self.optim, loss={},
                                     data_info={"class_names": ["crop", "weed"], "category_ids": [3, 7]})
        return module, self.clip

    def plain(self):
        from aifactory_train.recipes.crop_detection.model import build_detector

        cfg = self.model_cfg
        net = build_detector(cfg["name"], 3, min_size=cfg.get("min_size"), max_size=cfg.get("max_size"),
                             anchor_sizes=cfg.get("anchor_sizes"), extra=cfg.get("extra")).to(self.device).train()
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        if self.args._compile:
            net.backbone.compile()

        def step(batch):
            images, targets = batch
            return sum(net(images, targets).values())

        return net, step, self.clip

    def datamodule(self, workers: int):
        """The recipe's DataModule on freshly synthesised real files (12 batches' worth)."""
        from aifactory_train.recipes.crop_detection.data import CropDetectionDataModule
        from aifactory_train.recipes.crop_detection.synth import synthesize

        root = synthesize(Path(tempfile.mkdtemp()) / "crops", size=max(self.args.batch_size * 12, 96), seed=0)
        splits = {s: {"annotations": f"annotations/{s}.json", "images": f"images/{s}"} for s in ("train", "val")}
        return CropDetectionDataModule(root=str(root), splits=splits, batch_size=self.args.batch_size, num_workers=workers)

    def input_pipeline(self, workers: int) -> dict:
        return _time_loader(self.datamodule(workers), workers)

    def onnx_latency(self) -> dict:
        """CPU latency at batch 1 of the exported model (onnxruntime) and of the same model in eager PyTorch."""
        from aifactory_train.recipes.crop_detection.export import export_onnx
        from aifactory_train.records.telemetry import import_onnxruntime

        onnxruntime = import_onnxruntime()

        module, _ = self.module()
        out = Path(tempfile.mkdtemp())
        export_onnx(module, out, [self.args.image_size, self.args.image_size])
        session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        image = self.batches[0][0][0].cpu()
        net = module.net.eval().cpu()
        return {"input_hw": list(image.shape[1:]), "threads": torch.get_num_threads(),
                "onnxruntime_ms": _median_ms(lambda: session.run(None, {"image": image.numpy()})),
                "pytorch_eager_ms": _median_ms(lambda: net([image]))}


class ClinicalNotes:
    """Causal-LM fine-tuning: a Llama built from config, AdamW (fused on GPU), clipping at 1, loss on the last
    quarter of each row (the summary), SDPA; full rows of ``seq_len`` tokens, as packing gives."""

    # 16 x 512 tokens: a ~0.3 s CPU step. At 8 x 256 (65 ms) Lightning's own fixed cost per step, ~3 ms on 2
    # cores (a bare LightningModule with the plain loop's training step measured the same), is 5 % of the step.
    defaults = {"model": "llama_tiny", "batch_size": 16, "image_size": None, "seq_len": 512, "steps": 15}
    optim = {**OPTIM, "lr": 0.003, "weight_decay": 0.01}
    clip = 1.0
    fused_adamw = True  # on GPU, as the recipe's configure_optimizers

    def __init__(self, args, device):
        from omegaconf import OmegaConf

        from aifactory_train.locations import config_dir

        self.args, self.device = args, device
        self.model_cfg = OmegaConf.to_container(OmegaConf.load(config_dir() / "model" / f"{args.model}.yaml"))
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
        from aifactory_train.recipes.clinical_notes.module import ClinicalNotesModule

        return ClinicalNotesModule(model=self._model_cfg(), optim=self.optim, loss={}, data_info=self.data_info), self.clip

    def plain(self):
        from aifactory_train.recipes.clinical_notes.model import build_model

        net = build_model(self._model_cfg(), self.data_info).to(self.device).train()
        if self.args._compile:
            net.compile()

        def step(batch):
            return net(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss

        return net, step, self.clip

    def datamodule(self, workers: int):
        """The recipe's DataModule on synthetic notes written as JSONL (tagged variant: already de-identified)."""
        from aifactory_train.recipes.clinical_notes.data import ClinicalNotesDataModule
        from aifactory_train.recipes.clinical_notes.synth import synthesize

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
            from aifactory_train.recipes.clinical_notes.deidentify import Deidentifier
            from aifactory_train.recipes.clinical_notes.synth import generate_records

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


RECIPES = {"plastic_sorting": PlasticSorting, "crop_detection": CropDetection, "clinical_notes": ClinicalNotes}


def _time_loader(dm, workers: int) -> dict:
    dm.setup("fit")
    loader = dm.train_dataloader()
    rates = []
    for _ in range(2):  # the first pass starts the workers
        start, samples = time.perf_counter(), 0
        for images, _targets in loader:
            samples += len(images)
        rates.append(samples / (time.perf_counter() - start))
    return {"workers": workers, "samples_per_s": rates[-1], "files": len(dm.splits["train"])}


class PlainLoop:
    """The hand-written loop, built once and then stepped: ``run(steps)`` returns the seconds those steps took
    (device synchronised at both ends), so that it can run in blocks between blocks of the recipe."""

    def __init__(self, spec, device, precision: str, total_steps: int):
        from aifactory_train.run.schedules import warmup_cosine

        torch.manual_seed(0)
        self.spec, self.device = spec, device
        self.net, self.step_loss, self.clip = spec.plain()
        optim = getattr(spec, "optim", OPTIM)
        fused = getattr(spec, "fused_adamw", False) and device.type == "cuda"
        self.optimizer = torch.optim.AdamW([p for p in self.net.parameters() if p.requires_grad], lr=optim["lr"],
                                           weight_decay=optim["weight_decay"], fused=fused)
        self.scheduler = warmup_cosine(self.optimizer, total_steps, 20, 0.01)  # as the recipe's
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
        self.index = 0

    def run(self, steps: int) -> float:
        device_sync(self.device)
        start = time.perf_counter()
        batches = self.spec.batches
        for _ in range(steps):
            with self.autocast:
                loss = self.step_loss(batches[self.index % len(batches)])
            loss.backward()
            if self.clip:
                torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.index += 1
        device_sync(self.device)
        return time.perf_counter() - start


def plain_loop(spec, args, device, precision: str, meter=None) -> float:
    loop = PlainLoop(spec, device, precision, args.warmup + args.steps)
    loop.run(args.warmup)
    if meter:
        meter.start()
    seconds = loop.run(args.steps)
    if meter:
        meter.stop()
    return args.steps * args.batch_size / seconds


def recipe_loop(spec, args, device, precision: str, meter=None) -> float:
    import lightning as L
    from torch.utils.data import DataLoader, Dataset

    from aifactory_train.run.callbacks import TrainingThroughput

    class InMemory(Dataset):
        def __len__(self):
            return args.warmup + args.steps

        def __getitem__(self, index):
            return spec.batches[index % len(spec.batches)]

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == args.warmup:
                device_sync(device)
                self.start = time.perf_counter()
                if meter:
                    meter.start()

        def on_train_end(self, trainer, pl_module):
            device_sync(device)
            self.seconds = time.perf_counter() - self.start
            if meter:
                meter.stop()
            self.flops_per_sample = getattr(pl_module, "flops_per_sample", None)
            if getattr(pl_module, "flops_per_token", None):
                self.flops_per_sample = pl_module.flops_per_token * spec.tokens_per_sample

    torch.manual_seed(0)
    module, clip = spec.module()
    timer = Timer()
    trainer = L.Trainer(
        accelerator=device.type, devices=1, precision=precision, max_steps=args.warmup + args.steps, max_epochs=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=clip, callbacks=[timer, TrainingThroughput()],
    )
    trainer.fit(module, train_dataloaders=DataLoader(InMemory(), batch_size=None, num_workers=0))
    spec.flops_per_sample = timer.flops_per_sample  # as the recipe measured it (None if it does not)
    if meter is not None:
        meter.flops_per_sample = timer.flops_per_sample
    return args.steps * args.batch_size / timer.seconds


def pair_order(pairs: int) -> str:
    """Block order R (recipe) / P (plain loop): RP PR RP PR ... (ABBA), so that a load that grows or shrinks
    steadily through the run favours neither side; each pair's two blocks are back to back."""
    return "".join("RP" if i % 2 == 0 else "PR" for i in range(pairs))


def paired_summary(recipe_seconds: list[float], plain_seconds: list[float], samples_per_block: int) -> dict:
    """Recipe/plain ratios pair by pair (the same steps on each side, back to back) and their spread.

    Pure arithmetic, so that it is tested on fixed series. A pair's ratio is plain seconds / recipe seconds
    (= recipe samples/s / plain samples/s). The median is the figure; the interquartile range (inclusive
    quartiles) is the band a verdict must clear; min and max are shown, not used: one block that met another
    process's burst moves them but not the quartiles.
    """
    if len(recipe_seconds) != len(plain_seconds) or not recipe_seconds:
        raise ValueError(f"need as many recipe as plain blocks, at least one: {len(recipe_seconds)} vs {len(plain_seconds)}")
    ratios = [p / r for r, p in zip(recipe_seconds, plain_seconds)]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return {
        "ratio": statistics.median(ratios), "pair_ratios": ratios, "iqr": [q1, q3], "min": min(ratios), "max": max(ratios),
        "recipe_samples_per_s": statistics.median(samples_per_block / s for s in recipe_seconds),
        "plain_samples_per_s": statistics.median(samples_per_block / s for s in plain_seconds),
        "recipe_runs": [samples_per_block / s for s in recipe_seconds],
        "plain_runs": [samples_per_block / s for s in plain_seconds],
    }


def paired_blocks(spec, args, device, precision: str, pairs: int, block_seconds: float, meter=None,
                  clock: str = "wall") -> dict:
    """The recipe's Lightning step and the plain loop in alternating blocks of the same number of steps.

    One Trainer and one plain loop, each built once: the Trainer's callback runs the plain loop's blocks between
    the recipe's (``pair_order``). The last of the ``args.warmup`` (>= 1) steps of each side is timed and sets the
    block size: enough steps that a block lasts >= ``block_seconds``, so a block outlasts a scheduler hiccup; the
    median of the paired ratios then outvotes the pairs that met another process's burst.
    Returns ``paired_summary`` plus the block size, the recipe's peak GPU memory (measured before the plain loop
    exists) and its FLOPs per sample. ``meter`` (an EnergyMeter) adds up the recipe's blocks.

    ``clock``: "wall" (perf_counter; what a GPU run must use) or "cpu": this process's CPU time
    (``time.process_time``), for CPU devices on a shared machine, where wall time also counts the time the
    scheduler gave to other processes. The summary is of the chosen clock; ``wall`` holds the wall-clock one.
    """
    import math

    import lightning as L
    from torch.utils.data import DataLoader, Dataset

    from aifactory_train.run.callbacks import TrainingThroughput

    if args.warmup < 1:
        raise ValueError("paired_blocks needs warmup >= 1: the last warm-up step sizes the blocks")
    order = pair_order(pairs)

    class Endless(Dataset):
        def __len__(self):
            return 10**9  # the callback stops the fit

        def __getitem__(self, index):
            return spec.batches[index % len(spec.batches)]

    class Pairs(L.Callback):
        def __init__(self):
            self.recipe_seconds, self.plain_seconds = [], []  # wall
            self.recipe_cpu, self.plain_cpu = [], []
            self.position = 0  # in order
            self.block_end = args.warmup  # steps done when the current recipe stretch ends
            self.started = None
            self.steps = None
            self.peak_memory = None
            self.joules = self.energy_seconds = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == args.warmup - 1:  # the recipe's last warm-up step, timed to size the blocks
                device_sync(device)
                self.started, self.started_cpu = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            done = batch_idx + 1
            if done != self.block_end:
                return
            device_sync(device)
            seconds = time.perf_counter() - self.started
            cpu_seconds = time.process_time() - self.started_cpu
            if self.steps is None:
                recipe_step = seconds
                if device.type == "cuda":
                    self.peak_memory = torch.cuda.max_memory_allocated()
                # the plain loop's warm-up, its last step timed; its schedule is long enough for every block
                self.plain = PlainLoop(spec, device, precision, args.warmup + pairs * 10**6)
                self.plain.run(args.warmup - 1)
                plain_step = self.plain.run(1)
                self.steps = max(1, math.ceil(block_seconds / min(recipe_step, plain_step)))
            else:
                self.recipe_seconds.append(seconds)
                self.recipe_cpu.append(cpu_seconds)
                if meter:
                    meter.stop()
                    self.joules += meter.joules or 0.0
                    self.energy_seconds += meter.seconds or 0.0
                self.position += 1
            while self.position < len(order) and order[self.position] == "P":
                cpu_start = time.process_time()
                self.plain_seconds.append(self.plain.run(self.steps))
                self.plain_cpu.append(time.process_time() - cpu_start)
                self.position += 1
            if self.position == len(order):
                trainer.should_stop = True
                self.flops_per_sample = getattr(pl_module, "flops_per_sample", None)
                if getattr(pl_module, "flops_per_token", None):
                    self.flops_per_sample = pl_module.flops_per_token * spec.tokens_per_sample
                return
            self.block_end = done + self.steps
            if meter:
                meter.start()
            device_sync(device)
            self.started, self.started_cpu = time.perf_counter(), time.process_time()

    torch.manual_seed(0)
    module, clip = spec.module()
    callback = Pairs()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = L.Trainer(
        accelerator=device.type, devices=1, precision=precision, max_steps=-1, max_epochs=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=clip, callbacks=[callback, TrainingThroughput()],
    )
    trainer.fit(module, train_dataloaders=DataLoader(Endless(), batch_size=None, num_workers=0))
    if meter is not None:
        meter.flops_per_sample = callback.flops_per_sample
        if meter.available:
            meter.joules, meter.seconds = callback.joules, callback.energy_seconds
    samples = callback.steps * args.batch_size
    wall = paired_summary(callback.recipe_seconds, callback.plain_seconds, samples)
    result = paired_summary(callback.recipe_cpu, callback.plain_cpu, samples) if clock == "cpu" else wall
    return {**result, "clock": clock, "wall": wall, "steps_per_block": callback.steps, "pairs": pairs, "order": order,
            "block_seconds": block_seconds, "peak_memory_bytes": callback.peak_memory,
            "flops_per_sample": callback.flops_per_sample}


def data_wait_split(spec, args, device, precision: str, workers: int) -> dict:
    """Train on real files through the recipe's DataModule and split each step's wall time into waiting for
    the batch and computing it (the device is synchronised at both ends, so this run is for measuring only)."""
    import lightning as L

    class StepSplit(L.Callback):
        wait = compute = 0.0
        _end = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            device_sync(device)
            now = time.perf_counter()
            if batch_idx >= args.warmup and self._end is not None:
                self.wait += now - self._end
            self._start = now

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            device_sync(device)
            now = time.perf_counter()
            if batch_idx >= args.warmup:
                self.compute += now - self._start
            self._end = now

    torch.manual_seed(0)
    module, clip = spec.module()
    split = StepSplit()
    trainer = L.Trainer(
        accelerator=device.type, devices=1, precision=precision, max_steps=args.warmup + args.steps, max_epochs=-1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=clip, callbacks=[split],
    )
    trainer.fit(module, datamodule=spec.datamodule(workers))
    total = split.wait + split.compute
    return {"workers": workers, "data_wait_s": split.wait, "compute_s": split.compute,
            "data_wait_fraction": split.wait / total if total else None}


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """The recipe and its shape (None: the recipe's CPU default), shared with step_overhead.py."""
    parser.add_argument("recipe", choices=sorted(RECIPES))
    parser.add_argument("--model", default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None, help="clinical_notes: tokens per row")


def build_parser() -> argparse.ArgumentParser:
    """The command line (tests/test_gpu_scripts.py parses the GPU scripts' commands with it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_arguments(parser)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="auto", help="auto: bf16-mixed on GPU, 32-true on CPU")
    parser.add_argument("--compile", choices=["no", "yes", "both"], default="no",
                        help="torch.compile the model (crop_detection: its backbone + FPN), in both loops")
    parser.add_argument("--channels-last", choices=["auto", "true", "false"], default=None,
                        help="crop_detection: NHWC convolutions in both loops (default false, as its model configs; "
                             "plastic_sorting always uses auto: on GPU)")
    parser.add_argument("--workers", type=int, nargs="*", default=None, help="input-pipeline worker counts")
    parser.add_argument("--out", default=None, help="JSON file to write")
    parser.add_argument("--markdown", default=None, help="Markdown file to write")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    spec_class = RECIPES[args.recipe]
    for key, value in spec_class.defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision if args.precision != "auto" else ("bf16-mixed" if device.type == "cuda" else "32-true")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    args._compile = False
    spec = spec_class(args, device)
    rows = []
    for compiled in {"no": [False], "yes": [True], "both": [False, True]}[args.compile]:
        args._compile = compiled
        plain, recipe = [], []
        for _ in range(args.repeats):
            plain.append(plain_loop(spec, args, device, precision))
            recipe.append(recipe_loop(spec, args, device, precision))
        row = {"compile": compiled, "plain_samples_per_s": statistics.median(plain),
               "recipe_samples_per_s": statistics.median(recipe), "plain_runs": plain, "recipe_runs": recipe}
        row["ratio"] = row["recipe_samples_per_s"] / row["plain_samples_per_s"]
        tokens = getattr(spec, "tokens_per_sample", None)
        if tokens:
            row["plain_tokens_per_s"] = row["plain_samples_per_s"] * tokens
            row["recipe_tokens_per_s"] = row["recipe_samples_per_s"] * tokens
            module, _ = spec.module()
            row["flops_per_token"] = module.measure_flops_per_token()
            if device.type == "cuda":
                from lightning.fabric.utilities.throughput import get_available_flops

                peak = get_available_flops(device, torch.bfloat16)
                row["recipe_mfu"] = row["flops_per_token"] * row["recipe_tokens_per_s"] / peak if peak else None
                row["plain_mfu"] = row["flops_per_token"] * row["plain_tokens_per_s"] / peak if peak else None
        elif getattr(spec, "flops_per_sample", None):
            row["flops_per_sample"] = spec.flops_per_sample
            if device.type == "cuda":
                from lightning.fabric.utilities.throughput import get_available_flops

                peak = get_available_flops(device, torch.bfloat16)
                row["recipe_mfu"] = row["flops_per_sample"] * row["recipe_samples_per_s"] / peak if peak else None
                row["plain_mfu"] = row["flops_per_sample"] * row["plain_samples_per_s"] / peak if peak else None
        rows.append(row)
        extra = (f" ({row['plain_tokens_per_s']:.0f} vs {row['recipe_tokens_per_s']:.0f} tokens/s)" if tokens else "")
        print(f"compile={compiled}: plain {row['plain_samples_per_s']:.1f} samples/s, recipe "
              f"{row['recipe_samples_per_s']:.1f} samples/s, ratio {row['ratio']:.3f}{extra}", flush=True)
    workers = args.workers if args.workers is not None else ([2] if device.type == "cpu" else [4, 8, 12])
    pipeline = [spec.input_pipeline(w) for w in workers]
    for p in pipeline:
        print(f"input pipeline, {p['workers']} workers: {p['samples_per_s']:.1f} samples/s "
              f"(training step: {rows[0]['recipe_samples_per_s']:.1f})", flush=True)
        if p.get("deidentify_notes_per_s"):
            print(f"de-identification (deduce, 1 process): {p['deidentify_notes_per_s']:.0f} notes/s", flush=True)
    latency = spec.onnx_latency() if hasattr(spec, "onnx_latency") else None
    if latency:
        print(f"exported ONNX, batch 1, CPU: {latency['onnxruntime_ms']:.1f} ms (eager PyTorch "
              f"{latency['pytorch_eager_ms']:.1f} ms), input {latency['input_hw']}", flush=True)
    hardware = (torch.cuda.get_device_name(0) if device.type == "cuda"
                else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    result = {
        "benchmark": f"{args.recipe}_step", "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "date": time.strftime("%Y-%m-%d"), "hardware": hardware, "torch": torch.__version__,
        "model": args.model, "batch_size": args.batch_size, "image_size": args.image_size,
        "seq_len": getattr(args, "seq_len", None) if args.recipe == "clinical_notes" else None, "precision": precision,
        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
        "channels_last": getattr(spec, "channels_last", None),
        "step": rows, "input_pipeline": pipeline, "onnx_latency": latency,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        lines = [f"# {args.recipe} training step vs plain PyTorch — {hardware}, {result['date']}", "",
                 f"Command: `{result['command']}`", "",
                 f"torch {result['torch']}; {args.model}, batch {args.batch_size}, "
                 f"{f'{args.seq_len} tokens' if result['seq_len'] else f'{args.image_size} px'}, {precision}"
                 f"{', channels_last' if result['channels_last'] else ''}; "
                 f"median of {args.repeats} alternating runs of {args.steps} steps after {args.warmup} warm-up steps.", "",
                 "| compile | plain loop (samples/s) | recipe (samples/s) | ratio |", "|---|---|---|---|"]
        lines += [f"| {r['compile']} | {r['plain_samples_per_s']:.2f} | {r['recipe_samples_per_s']:.2f} | {r['ratio']:.3f} |"
                  for r in rows]
        if result["seq_len"]:
            lines += ["", "| compile | plain loop (tokens/s) | recipe (tokens/s) | recipe MFU | training FLOPs/token |",
                      "|---|---|---|---|---|"]
            lines += [f"| {r['compile']} | {r['plain_tokens_per_s']:.0f} | {r['recipe_tokens_per_s']:.0f} | "
                      f"{r.get('recipe_mfu') if r.get('recipe_mfu') is not None else 'n/a (CPU)'} | {r['flops_per_token']:,} |"
                      for r in rows]
        if rows[0].get("flops_per_sample"):
            lines += ["", "| compile | training FLOPs/sample (the recipe's count) | plain MFU | recipe MFU |", "|---|---|---|---|"]
            lines += [f"| {r['compile']} | {r['flops_per_sample']:,} | "
                      + " | ".join(f"{r[k]:.3f}" if r.get(k) is not None else "n/a (CPU)" for k in ("plain_mfu", "recipe_mfu"))
                      + " |" for r in rows]
        lines += ["", "Input pipeline alone (real files through the recipe's DataModule, in DataLoader workers):", "",
                  "| workers | samples/s | training step samples/s |", "|---|---|---|"]
        lines += [f"| {p['workers']} | {p['samples_per_s']:.1f} | {rows[0]['recipe_samples_per_s']:.2f} |" for p in pipeline]
        deid = [p for p in pipeline if p.get("deidentify_notes_per_s")]
        if deid:
            lines += ["", f"De-identification (deduce, one process, synthetic notes of ~420 characters): "
                          f"{deid[0]['deidentify_notes_per_s']:.0f} notes/s."]
        if latency:
            lines += ["", f"Exported ONNX model, batch 1, CPU ({latency['threads']} threads), input {latency['input_hw']}: "
                          f"onnxruntime {latency['onnxruntime_ms']:.1f} ms median; eager PyTorch {latency['pytorch_eager_ms']:.1f} ms."]
        Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
