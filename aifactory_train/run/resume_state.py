"""What an exact resume needs beyond Lightning's own checkpoint (model, optimizer, LR scheduler, loop counters),
apart from the data position (``loaders``):

* **Random number generators**: Lightning does not save them. ``RNGStateCallback`` keeps every rank's torch,
  numpy and Python RNG states in the checkpoint and gives each rank its own back (dropout, MixUp and whatever
  else the main process draws continue as if never interrupted).
* **Atomic files**: ``AtomicCheckpointIO`` writes ``<file>.tmp`` and renames it, so a kill while saving leaves the
  previous checkpoint whole (Lightning writes the final path directly).
* **Step boundaries**: ``StepBoundary`` tells whether a batch stepped the optimizer; mid-epoch saves
  (``periodic_checkpoint``, and the stop checkpoint of ``preemption``) happen only there.

Where to resume from (``ckpt_path=auto``) is ``checkpoints.find_resume_checkpoint``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".tmp")
        torch.save(checkpoint, partial)
        os.replace(partial, path)  # atomic on POSIX: readers see the old file or the new one


def is_epoch_last_batch(trainer: L.Trainer) -> bool:
    return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


class StepBoundary:
    """Whether the batch that just ended stepped the optimizer. With gradient accumulation (or a global batch
    spread over fewer ranks) most batches only add to the gradients, which no checkpoint holds: a state saved after
    one of them resumes with that part of the step lost (measured: other weights than the uninterrupted run). The
    callbacks that save mid-epoch save only where this says so. It compares the optimizer step count before and after
    the batch (public, and the same for every strategy) rather than asking Lightning's private accumulation test."""

    def __init__(self) -> None:
        self._step_before: int | None = None

    def batch_started(self, trainer: L.Trainer) -> None:
        self._step_before = trainer.global_step

    def stepped(self, trainer: L.Trainer) -> bool:
        return self._step_before is None or trainer.global_step != self._step_before


def periodic_checkpoint(dirpath: Path, every_n_train_steps: int | None, every_n_minutes: float | None):
    """``last.ckpt`` every N steps and/or minutes, except on an epoch's last batch.

    Why the exception: Lightning 2.6 cannot resume exactly from a state saved after the last batch of an epoch
    but before the epoch's end (it skips the next epoch, and the epoch's validation). The epoch-end checkpoint of
    the recipe's monitor callback follows a moment later, so nothing is lost; without one (validation less often
    than every epoch) the next periodic save comes one interval later."""
    from datetime import timedelta

    from lightning.pytorch.callbacks import ModelCheckpoint

    class PeriodicCheckpoint(ModelCheckpoint):
        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            self.boundary = StepBoundary()  # every N minutes could otherwise land between two accumulated batches

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.boundary.batch_started(trainer)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if not is_epoch_last_batch(trainer) and self.boundary.stepped(trainer):
                super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    return PeriodicCheckpoint(
        dirpath=dirpath, save_top_k=0, save_last=True, enable_version_counter=False,
        every_n_train_steps=every_n_train_steps,
        train_time_interval=timedelta(minutes=every_n_minutes) if every_n_minutes else None)


def _rng_states() -> dict[str, Any]:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    # tensors and plain numbers only, so checkpoints still load with weights_only=True
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(states["python"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RNGStateCallback(L.Callback):
    """Every rank's RNG states in the checkpoint (gathered to the rank that writes it), each rank's back on load."""

    def __init__(self) -> None:
        self._pending: list | None = None

    def state_dict(self) -> dict[str, Any]:
        states = _rng_states()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, states)
            return {"ranks": gathered}
        return {"ranks": [states]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("ranks")

    def on_train_start(self, trainer, pl_module) -> None:
        # restored after Lightning's own set-up (which may draw random numbers), right before the first batch
        if self._pending:
            rank = trainer.global_rank
            if rank < len(self._pending):
                _set_rng_states(self._pending[rank])
            self._pending = None
