"""List the host-device synchronisations in a recipe's training step (CUDA only).

torch.cuda.set_sync_debug_mode("warn") makes every synchronising CUDA call warn with its stack; a sync in
every step keeps the CPU from queueing the next step and costs throughput. The module and its in-memory batches
come from the recipe's bench adapter (``<recipe>/bench.py``) at its CPU defaults.
    python benchmarks/gpu/find_syncs.py NAME
"""

import argparse
import collections
import traceback
import warnings
from types import SimpleNamespace

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from aifactory_train.bench.adapters import bench_adapter, bench_adapters
from aifactory_train.run.callbacks import TrainingThroughput

STEPS = 12


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", choices=sorted(bench_adapters()), help="a recipe with a bench adapter")
    return parser


class SyncWatch(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 4:
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_end(self, trainer, pl_module):
        torch.cuda.set_sync_debug_mode(0)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    adapter = bench_adapter(args.recipe)
    spec = adapter.build(SimpleNamespace(**{"seq_len": None, **adapter.DEFAULTS}, _compile=False, channels_last=None),
                         torch.device("cuda"))

    class InMemory(Dataset):
        def __len__(self):
            return STEPS

        def __getitem__(self, i):
            return spec.batches[i % len(spec.batches)]

    sites = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            stack = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
            interesting = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in stack[-8:]]
            sites[" <- ".join(reversed(interesting))] += 1

    warnings.showwarning = record
    warnings.simplefilter("always")  # count every call, not the first per site
    module, clip = spec.module()
    trainer = L.Trainer(accelerator="cuda", devices=1, precision="bf16-mixed", max_steps=STEPS, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, gradient_clip_val=clip, callbacks=[SyncWatch(), TrainingThroughput()])
    trainer.fit(module, train_dataloaders=DataLoader(InMemory(), batch_size=None))
    print(f"synchronising calls in {STEPS - 4} steps:")
    for site, count in sites.most_common():
        print(f"{count:4d}x {site}")


if __name__ == "__main__":
    main()
