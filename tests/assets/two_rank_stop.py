"""A 2-rank CPU run (Lightning's DDP launcher starts this script again as rank 1) with SignalCheckpoint, for
tests/test_resume.py::test_ranks_agree_on_a_stop_without_waiting_on_each_other_every_step.

    python tests/assets/two_rank_stop.py OUT_DIR SIGNAL_AT   # SIGNAL_AT: the batch after which rank 1 alone gets a
                                                             # real SIGTERM; -1 for none

Each rank writes OUT_DIR/rank<r>.json: the global step it stopped at (or null when it trained to the end) and
every torch.distributed.broadcast / all_reduce call made while a training batch was under way (from the fetch of
the batch to the end of its on_train_batch_end), with the batch's index, its group and whether it was
asynchronous. DDP's gradient all-reduce runs in C++ and is not among them: what is counted is what the loop adds
to each step.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist

from aifactory_train.run.preemption import JobStopped, SignalCheckpoint

STEPS = 12

out, signal_at = Path(sys.argv[1]), int(sys.argv[2])
calls: list[dict] = []
in_batch = {"on": False, "batch": -1}


def counted(collective):
    def wrapper(*args, **kwargs):
        if in_batch["on"]:
            group = kwargs.get("group")
            calls.append({"op": collective.__name__, "batch": in_batch["batch"], "async": bool(kwargs.get("async_op")),
                          "group": "default" if group in (None, dist.group.WORLD) else dist.get_backend(group)})
        return collective(*args, **kwargs)
    return wrapper


dist.broadcast, dist.all_reduce = counted(dist.broadcast), counted(dist.all_reduce)


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(STEPS * 2 * 4, 8), batch_size=4)  # 12 batches per rank


class Window(L.Callback):
    """Marks the span of a training batch; Lightning's per-step SIGTERM broadcast comes before the fetch, so the
    span opens at the end of the previous batch."""

    def on_train_start(self, trainer, pl_module):
        in_batch.update(on=True, batch=0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == 1 and batch_idx == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)  # this rank only: the other must learn of it from the decision


class NextStep(L.Callback):
    """Runs after SignalCheckpoint (callbacks run in list order): the next batch's span begins."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        in_batch["batch"] = batch_idx + 1
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:  # the epoch's end follows, not a batch
            in_batch["on"] = False


trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=1, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=out, callbacks=[Window(), SignalCheckpoint(), NextStep()])
stopped_at = None
try:
    trainer.fit(Tiny())
except JobStopped:
    stopped_at = trainer.global_step
(out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"stopped_at": stopped_at, "calls": calls}))
