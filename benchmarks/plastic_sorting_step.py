"""plastic_sorting: the recipe's Lightning training step vs a hand-written PyTorch loop, and the input
pipeline on real PNG files vs the training step.

Both loops run in this one process on the same model, batch, precision and in-memory data, alternating
(plain, recipe, plain, recipe, ...) so that machine noise hits both; the medians are compared.
The recipe side is the real `PlasticSortingModule` in a `lightning.Trainer` (with the recipe's throughput
callback; no logger or checkpointing, which the plain loop does not have either).

    python benchmarks/plastic_sorting_step.py                      # CPU defaults (resnet18, 64 px, batch 32)
    python benchmarks/plastic_sorting_step.py --model resnet50 --image-size 224 --batch-size 256 \
        --steps 60 --compile both                                  # one GPU
Writes a JSON (and a Markdown table with --markdown) with the exact command.
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

CLASSES = 7


def device_sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_batches(args, device, channels: int = 3, count: int = 8):
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(args.batch_size, channels, args.image_size, args.image_size, generator=gen).to(device),
         torch.randint(0, CLASSES, (args.batch_size,), generator=gen).to(device))
        for _ in range(count)
    ]


def module_config(args):
    model = {"name": args.model, "weights_path": None, "channels_last": "auto", "compile": args._compile}
    optim = {"name": "adamw", "lr": 0.002, "weight_decay": 0.05, "momentum": 0.9, "warmup_steps": 20, "min_lr_ratio": 0.01}
    loss = {"label_smoothing": 0.1}
    data_info = {"class_names": [f"c{i}" for i in range(CLASSES)], "channels": ["r", "g", "b"], "image_size": args.image_size}
    return model, optim, loss, data_info


def plain_loop(args, batches, device, precision: str) -> float:
    """Hand-written: the same model, optimizer, schedule, loss and autocast as the recipe."""
    from aifactory_train.models import build_torchvision_classifier
    from aifactory_train.schedules import warmup_cosine

    torch.manual_seed(0)
    net = build_torchvision_classifier(args.model, CLASSES).to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if args._compile:
        net.compile()
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.002, weight_decay=0.05)
    scheduler = warmup_cosine(optimizer, args.warmup + args.steps, 20, 0.01)  # as the recipe's
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    start = None
    for step in range(total):
        if step == args.warmup:
            device_sync(device)
            start = time.perf_counter()
        images, labels = batches[step % len(batches)]
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast:
            loss = F.cross_entropy(net(images), labels, label_smoothing=0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    device_sync(device)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def recipe_loop(args, batches, device, precision: str) -> float:
    import lightning as L
    from torch.utils.data import DataLoader, Dataset

    from aifactory_train.callbacks import TrainingThroughput
    from aifactory_train.recipes.plastic_sorting.module import PlasticSortingModule

    class InMemory(Dataset):
        def __len__(self):
            return args.warmup + args.steps

        def __getitem__(self, index):
            return batches[index % len(batches)]

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == args.warmup:
                device_sync(device)
                self.start = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            device_sync(device)
            self.seconds = time.perf_counter() - self.start

    torch.manual_seed(0)
    model, optim, loss, data_info = module_config(args)
    module = PlasticSortingModule(model=model, optim=optim, loss=loss, data_info=data_info)
    timer = Timer()
    trainer = L.Trainer(
        accelerator=device.type, devices=1, precision=precision, max_steps=args.warmup + args.steps, max_epochs=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer, TrainingThroughput()],
    )
    trainer.fit(module, train_dataloaders=DataLoader(InMemory(), batch_size=None, num_workers=0))
    return args.steps * args.batch_size / timer.seconds


def input_pipeline(args, workers: int) -> dict:
    """Samples/s of the recipe's DataModule alone (decode + augment of real PNGs in workers)."""
    from aifactory_train.recipes.plastic_sorting.data import PlasticSortingDataModule
    from aifactory_train.recipes.plastic_sorting.synth import synthesize

    root = Path(tempfile.mkdtemp()) / "plastic"
    synthesize(root, size=max(args.batch_size * 12, 560), seed=0)
    dm = PlasticSortingDataModule(root=str(root), image_size=args.image_size, batch_size=args.batch_size,
                                  num_workers=workers, verify_files=False)
    dm.setup("fit")
    loader = dm.train_dataloader()
    results = []
    for _ in range(2):  # first pass starts the workers
        start, samples = time.perf_counter(), 0
        for images, _labels in loader:
            samples += images.shape[0]
        results.append(samples / (time.perf_counter() - start))
    return {"workers": workers, "samples_per_s": results[-1], "files": len(dm.splits["train"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="auto", help="auto: bf16-mixed on GPU, 32-true on CPU")
    parser.add_argument("--compile", choices=["no", "yes", "both"], default="no")
    parser.add_argument("--workers", type=int, nargs="*", default=None, help="input-pipeline worker counts")
    parser.add_argument("--out", default=None, help="JSON file to write")
    parser.add_argument("--markdown", default=None, help="Markdown file to write")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision
    if precision == "auto":
        precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    batches = make_batches(args, device)
    rows = []
    for compiled in {"no": [False], "yes": [True], "both": [False, True]}[args.compile]:
        args._compile = compiled
        plain, recipe = [], []
        for _ in range(args.repeats):
            plain.append(plain_loop(args, batches, device, precision))
            recipe.append(recipe_loop(args, batches, device, precision))
        row = {
            "compile": compiled,
            "plain_samples_per_s": statistics.median(plain),
            "recipe_samples_per_s": statistics.median(recipe),
            "plain_runs": plain,
            "recipe_runs": recipe,
        }
        row["ratio"] = row["recipe_samples_per_s"] / row["plain_samples_per_s"]
        rows.append(row)
        print(f"compile={compiled}: plain {row['plain_samples_per_s']:.1f} samples/s, recipe "
              f"{row['recipe_samples_per_s']:.1f} samples/s, ratio {row['ratio']:.3f}", flush=True)
    workers = args.workers if args.workers is not None else ([2] if device.type == "cpu" else [4, 8, 12])
    pipeline = [input_pipeline(args, w) for w in workers]
    for p in pipeline:
        print(f"input pipeline, {p['workers']} workers: {p['samples_per_s']:.1f} samples/s "
              f"(training step: {rows[0]['recipe_samples_per_s']:.1f})", flush=True)
    result = {
        "benchmark": "plastic_sorting_step",
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "hardware": torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "model": args.model, "batch_size": args.batch_size, "image_size": args.image_size, "precision": precision,
        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
        "step": rows,
        "input_pipeline": pipeline,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        lines = [f"# plastic_sorting training step vs plain PyTorch — {result['hardware']}, {result['date']}", "",
                 f"Command: `{result['command']}`", "",
                 f"torch {result['torch']}; {args.model}, batch {args.batch_size}, {args.image_size} px, {precision}; "
                 f"median of {args.repeats} alternating runs of {args.steps} steps after {args.warmup} warm-up steps.", "",
                 "| compile | plain loop (samples/s) | recipe (samples/s) | ratio |", "|---|---|---|---|"]
        lines += [f"| {r['compile']} | {r['plain_samples_per_s']:.1f} | {r['recipe_samples_per_s']:.1f} | {r['ratio']:.3f} |"
                  for r in rows]
        lines += ["", "Input pipeline alone (real PNG files, decode + augment in DataLoader workers):", "",
                  "| workers | samples/s | training step samples/s |", "|---|---|---|"]
        lines += [f"| {p['workers']} | {p['samples_per_s']:.1f} | {rows[0]['recipe_samples_per_s']:.1f} |" for p in pipeline]
        Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
