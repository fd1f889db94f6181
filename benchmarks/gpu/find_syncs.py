"""List the host-device synchronisations in the recipe's training step (CUDA only).

torch.cuda.set_sync_debug_mode("warn") makes every synchronising CUDA call warn with its stack; a sync in
every step keeps the CPU from queueing the next step and costs throughput.
    python benchmarks/gpu/find_syncs.py
"""

import collections
import traceback
import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from aifactory_train.run.callbacks import TrainingThroughput
from aifactory_train.recipes.plastic_sorting.module import PlasticSortingModule

batches = [(torch.randn(64, 3, 64, 64, device="cuda"), torch.randint(0, 7, (64,), device="cuda")) for _ in range(4)]
STEPS = 12


class InMemory(Dataset):
    def __len__(self):
        return STEPS

    def __getitem__(self, i):
        return batches[i % 4]


class SyncWatch(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 4:
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_end(self, trainer, pl_module):
        torch.cuda.set_sync_debug_mode(0)


sites = collections.Counter()


def record(message, category, filename, lineno, file=None, line=None):
    if "synchroniz" in str(message):
        stack = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
        interesting = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in stack[-8:]]
        sites[" <- ".join(reversed(interesting))] += 1


warnings.showwarning = record
warnings.simplefilter("always")  # count every call, not the first per site
module = PlasticSortingModule(
    model={"name": "resnet18", "channels_last": "auto"},
    optim={"name": "adamw", "lr": 1e-3, "weight_decay": 0.05, "momentum": 0.9, "warmup_steps": 2, "min_lr_ratio": 0.01},
    loss={"label_smoothing": 0.1},
    data_info={"class_names": [str(i) for i in range(7)], "channels": ["r", "g", "b"], "image_size": 64},
)
trainer = L.Trainer(accelerator="cuda", devices=1, precision="bf16-mixed", max_steps=STEPS, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    limit_val_batches=0, callbacks=[SyncWatch(), TrainingThroughput()])
trainer.fit(module, train_dataloaders=DataLoader(InMemory(), batch_size=None))
print(f"synchronising calls in {STEPS - 4} steps:")
for site, count in sites.most_common():
    print(f"{count:4d}x {site}")
