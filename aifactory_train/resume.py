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
from torchdata.stateful_dataloader.sampler import RandomSampler as _TorchdataRandomSampler

# torchdata 0.11 calls a torch API that torch now marks deprecated, on every iterator; nothing to act on
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")

ResumableDataLoader = StatefulDataLoader  # the recipes' DataLoader: same arguments as torch's, plus state_dict()


class StatefulRandomSampler(_TorchdataRandomSampler, torch.utils.data.RandomSampler):
    """torchdata's shuffling sampler (its generator state travels in the checkpoint), that is also a torch
    RandomSampler. Lightning gives DDP and DeepSpeed a *shuffling* DistributedSampler only when it recognises the
    loader as shuffled, and with torchdata's class alone a DeepSpeed run was not shuffled at all (caught by the
    test that ZeRO-2 trains the same weights as DDP). Use ``sampler=shuffled(dataset)`` instead of
    ``shuffle=True``."""


def shuffled(dataset) -> StatefulRandomSampler:
    return StatefulRandomSampler(dataset)


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


class JobRequeued(BaseException):
    """Raised on every rank after the requeue checkpoint is saved and the job is requeued: the process ends
    without a summary, and the MLflow run stays open for the requeued job to continue."""


REQUEUE_CHECK_EVERY_N_STEPS = 10  # ranks agree on a pending signal this often (a collective; cheap, not free)


class SlurmRequeue(L.Callback):
    """On the requeue signal (Slurm's ``--signal=USR1@<s>``, sent to every rank): save ``hpc_ckpt_<n>.ckpt`` at
    the next step boundary the ranks agree on, ``scontrol requeue`` the job, and stop.

    Why not Lightning's own auto-requeue: it saves from inside the signal handler, at whatever point the signal
    lands. A checkpoint taken in the middle of a step counts that step's batch as served but not trained, and the
    requeued run then ends one step short (measured: 119 of 120 steps). Saving between steps keeps the count, the
    data position and the RNG states consistent. ``train.py`` turns Lightning's handler off
    (``SLURMEnvironment(auto_requeue=False)``) when this runs.
    """

    def __init__(self, signum: int | None = None) -> None:
        import signal

        self.signum = signum or signal.SIGUSR1
        self.received = False

    def on_train_start(self, trainer, pl_module) -> None:
        import signal

        def handler(signum, frame) -> None:
            self.received = True

        signal.signal(self.signum, handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.world_size > 1:
            if trainer.global_step % REQUEUE_CHECK_EVERY_N_STEPS != 0:
                return
            pending = trainer.strategy.reduce_boolean_decision(self.received, all=False)
        else:
            pending = self.received
        if not pending:
            return
        import subprocess

        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            job = os.environ.get("SLURM_JOB_ID", "")
            if os.environ.get("SLURM_ARRAY_JOB_ID"):
                job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"saved {path}, but `scontrol requeue {job}` failed ({result.returncode}): "
                                   f"{result.stderr.strip()}; resubmit the same `aift launch` (ckpt_path=auto resumes)")
        raise JobRequeued(str(path))
