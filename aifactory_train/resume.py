"""What an exact resume needs beyond Lightning's own checkpoint (model, optimizer, LR scheduler, loop counters).

* **Data position**: the recipes' DataLoaders are torchdata's ``StatefulDataLoader``; Lightning saves its state
  (sampler order, batches already served, worker states) in the checkpoint and restores it, so a run resumed
  mid-epoch continues with the next batch instead of replaying the epoch.
* **Random number generators**: Lightning does not save them. ``RNGStateCallback`` keeps every rank's torch,
  numpy and Python RNG states in the checkpoint and gives each rank its own back (dropout, MixUp, augmentation
  draws continue as if never interrupted).
* **Atomic files**: ``AtomicCheckpointIO`` writes ``<file>.tmp`` and renames it, so a kill while saving leaves the
  previous checkpoint whole (Lightning writes the final path directly).
* **Where to resume from**: ``find_resume_checkpoint`` (``ckpt_path=auto``) picks the newest of Lightning's
  Slurm requeue checkpoint (``hpc_ckpt_*.ckpt``) and ``checkpoints/last.ckpt`` in the run folder.
"""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torchdata.stateful_dataloader import StatefulDataLoader

# torchdata 0.11 calls a torch API that torch now marks deprecated, on every iterator; nothing to act on
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")

ResumableDataLoader = StatefulDataLoader  # the recipes' DataLoader: same arguments as torch's, plus state_dict()


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".tmp")
        torch.save(checkpoint, partial)
        os.replace(partial, path)  # atomic on POSIX: readers see the old file or the new one


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


def find_resume_checkpoint(run_dir: Path) -> str | None:
    """The newest checkpoint a requeued or restarted job should continue from, or None for a fresh start."""
    from aifactory_train.checkpoints import CHECKPOINT_DIR, is_checkpoint

    candidates = [p for p in run_dir.glob("hpc_ckpt_*.ckpt") if is_checkpoint(p)]
    last = run_dir / CHECKPOINT_DIR / "last.ckpt"
    if is_checkpoint(last):
        candidates.append(last)
    if not candidates:
        return None
    return str(max(candidates, key=lambda p: p.stat().st_mtime))
