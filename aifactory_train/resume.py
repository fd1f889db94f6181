"""What an exact resume needs beyond Lightning's own checkpoint (model, optimizer, LR scheduler, loop counters).

* **Data position**: the recipes' DataLoaders are torchdata's ``StatefulDataLoader``; Lightning saves its state
  (sampler order, batches already served, worker states) in the checkpoint and restores it, so a run resumed
  mid-epoch continues with the next batch instead of replaying the epoch.
* **Random number generators**: Lightning does not save them. ``RNGStateCallback`` keeps every rank's torch,
  numpy and Python RNG states in the checkpoint and gives each rank its own back (dropout, MixUp and whatever
  else the main process draws continue as if never interrupted).
* **Augmentation in DataLoader workers**: no checkpoint can hold the workers' RNG states (they have drawn ahead
  for prefetched batches). ``ResumableDataLoader`` instead seeds torch, numpy and ``random`` for each sample from
  (seed, epoch, sample index) while the dataset reads it (``SeededSamples``), so a sample's augmentation is the
  same whichever worker makes it, whenever, and however many workers there are.
* **Atomic files**: ``AtomicCheckpointIO`` writes ``<file>.tmp`` and renames it, so a kill while saving leaves the
  previous checkpoint whole (Lightning writes the final path directly).
* **Where to resume from**: ``find_resume_checkpoint`` (``ckpt_path=auto``) picks, of the stop/requeue checkpoints
  (``hpc_ckpt_*.ckpt``) and ``checkpoints/last.ckpt`` in the run folder, the one furthest in training.
"""

from __future__ import annotations

import logging
import math
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
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

# torchdata 0.11 calls a torch API that torch now marks deprecated, on every iterator; nothing to act on
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
log = logging.getLogger(__name__)


class _IgnoreSIGTERM:
    """Worker init: DataLoader workers ignore SIGTERM. Slurm signals every process of a job step, and a worker
    killed by it failed the main process's next fetch before it could save; the main process ends its workers
    itself when it stops."""

    def __init__(self, then=None):
        self.then = then

    def __call__(self, worker_id: int) -> None:
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.then is not None:
            self.then(worker_id)


class SampleKey(int):
    """A sample index as ``ResumableSampler`` hands it out: an ``int``, plus the seed and epoch it was drawn for,
    which travel with it to the worker that reads the sample (a persistent worker's copy of the sampler would be
    an epoch behind)."""

    def __new__(cls, index: int, seed: int, epoch: int):
        key = super().__new__(cls, index)
        key.seed, key.epoch = seed, epoch
        return key

    def __reduce__(self):
        return SampleKey, (int(self), self.seed, self.epoch)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed that is a pure function of (seed, epoch, index): the same in every process and run."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest(), "little")


def _seed_all(seed: int) -> None:
    torch.default_generator.manual_seed(seed)  # the CPU generator only: torch.manual_seed would reseed CUDA too
    np.random.seed(seed & 0xFFFFFFFF)  # numpy's legacy seed takes 32 bits
    random.seed(seed)


class SeededSamples(torch.utils.data.Dataset):
    """A map-style dataset whose every item is read with torch's (CPU), numpy's and Python's global RNGs seeded
    from (seed, epoch, index); in the main process they are put back as they were afterwards.

    Why: augmentations (torchvision transforms v2 draw from torch's global RNG) ran in DataLoader workers whose
    RNGs were seeded once per worker and then advanced by every sample the worker made, prefetched ones included.
    A resumed run starts fresh workers, so every augmentation after the resume differed (measured with
    plastic_sorting's 2 workers: 210 of 244 weight tensors other than the uninterrupted run's). Seeded per sample,
    the draws depend on nothing that a kill, the number of workers or prefetching changes; put back, the caller's
    streams (the main process's, with 0 workers) are not advanced by the dataset at all. Cost in a worker: about
    25 µs a sample (measured on a loaded 2-core machine; decoding a 64x64 PNG takes longer). Indices without an
    epoch (a loader without ``shuffled``: validation) use epoch -1."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        seed = sample_seed(getattr(index, "seed", self.seed), getattr(index, "epoch", -1), int(index))
        if torch.utils.data.get_worker_info() is not None:
            # a worker: nothing else draws from its streams but collate_fn, which then draws from where the
            # batch's last sample left them (a pure function of that sample too). Not putting them back saves
            # numpy's get_state/set_state, ~200 µs a sample
            _seed_all(seed)
            return self.dataset[int(index)]
        torch_state, numpy_state, python_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
        try:  # the main process (0 workers): its streams (dropout, MixUp) must not move with the data
            _seed_all(seed)
            return self.dataset[int(index)]
        finally:
            torch.set_rng_state(torch_state)
            np.random.set_state(numpy_state)
            random.setstate(python_state)

    def __getattr__(self, name: str):
        # the wrapped dataset's own attributes (not dunders: DataLoader must not find a __getitems__ that skips
        # the seeding); "dataset" itself is missing only while unpickling
        if name.startswith("__") or name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class ResumableDataLoader(StatefulDataLoader):
    """The recipes' DataLoader: torch's arguments, plus ``state_dict()`` (torchdata), workers that leave SIGTERM
    to the main process, and a map-style dataset read through ``SeededSamples`` (``loader.dataset`` is that
    wrapper; its ``.dataset`` is the one passed in)."""

    def __init__(self, dataset, *args, worker_init_fn=None, **kwargs):
        if not isinstance(worker_init_fn, _IgnoreSIGTERM):
            worker_init_fn = _IgnoreSIGTERM(worker_init_fn)
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        if not isinstance(dataset, (SeededSamples, torch.utils.data.IterableDataset)):
            dataset = SeededSamples(dataset, seed)
        if kwargs.get("generator") is None:
            # torch draws each new iterator's worker base seed from this generator, by default from the global
            # RNG: a resumed run with persistent workers made its validation iterator anew after the RNG states were
            # restored, one draw the uninterrupted run had made before its checkpoint, and the main process's
            # draws (Faster R-CNN's proposal sampling, dropout) differed from then on
            kwargs["generator"] = torch.Generator().manual_seed(seed)
        super().__init__(dataset, *args, worker_init_fn=worker_init_fn, **kwargs)


class ResumableSampler(StatefulDistributedSampler):
    """The recipes' shuffling sampler: a ``DistributedSampler`` (so Lightning keeps it under DDP, FSDP and
    DeepSpeed instead of swapping in its own) whose checkpointed state holds the epoch as well as the position.

    Why not torch's or torchdata's samplers as they are: on resume Lightning creates the data iterator *before* it
    calls ``set_epoch``, so a sampler whose order depends on the epoch but does not save it replays epoch 0's
    order (DDP mid-epoch resumes went wrong this way), and torchdata's ``RandomSampler`` keeps a generator state
    that is only right mid-epoch (a resume from an epoch's last step shuffled the next epoch differently).
    Here the order is a pure function of (seed, epoch, rank), and the loaded state sets the epoch before the
    iterator is made. Use ``sampler=shuffled(dataset)`` instead of ``shuffle=True``.

    **On another number of ranks** (an elastic resume mid-epoch), the epoch still visits every sample once. The
    ``R`` ranks that saved had each taken ``yielded`` samples of their share: together, the first ``yielded * R``
    of the epoch's order as ``R`` ranks split it. The new ranks split what follows (a *cut*, kept in the state
    until the epoch ends, so a second resume on yet another count cuts again). torchdata's sampler would instead
    skip ``yielded`` samples of each new share: samples seen twice and others not at all."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cuts: list[tuple[int, int]] = []  # this epoch's earlier rank counts: (positions consumed, ranks)
        self.elastic_resume = False  # set on loading a state of another rank count, for ElasticEpochProgress

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.cuts = []  # a cut belongs to the epoch it happened in
        super().set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "epoch": self.epoch, "num_replicas": self.num_replicas,
                "cuts": [list(cut) for cut in self.cuts]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.epoch = state_dict.get("epoch", self.epoch)
        self.cuts = [(int(a), int(b)) for a, b in state_dict.get("cuts", [])]
        saved_ranks = state_dict.get("num_replicas", self.num_replicas)
        saved_share = math.ceil(len(self.dataset) / saved_ranks)  # what each of those ranks had in this epoch
        if saved_ranks != self.num_replicas and not self.drop_last and 0 < self.next_yielded < saved_share:
            self.cuts.append((self.next_yielded * saved_ranks, saved_ranks))
            self.next_yielded = 0
            self.elastic_resume = True

    def __iter__(self):
        epoch = self.epoch  # read when the first index is asked for, as the order is drawn
        for index in self._indices():
            yield SampleKey(index, self.seed, epoch)  # so that SeededSamples seeds the sample's augmentation

    def _indices(self):
        if not self.cuts:
            yield from super().__iter__()
            return
        self.yielded = self.next_yielded or 0
        self.next_yielded = None
        for index in self.remaining_share()[self.yielded:]:
            self.yielded += 1
            yield index

    def remaining_share(self) -> list[int]:
        """This rank's part of what the epoch has left after its cuts."""
        order = self._epoch_order()
        for consumed, ranks in self.cuts:
            order = _padded(order, ranks)[consumed:]
        return _padded(order, self.num_replicas)[self.rank::self.num_replicas]

    def _epoch_order(self) -> list[int]:
        """The epoch's order before it is split over ranks, as ``DistributedSampler.__iter__`` draws it."""
        if not self.shuffle:
            return list(range(len(self.dataset)))
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.dataset), generator=generator).tolist()


def _padded(order: list[int], ranks: int) -> list[int]:
    """``order`` made a multiple of ``ranks`` long, as ``DistributedSampler`` does: repeated from its start."""
    padding = -len(order) % ranks
    if padding == 0:
        return list(order)
    return list(order) + (list(order) * math.ceil(padding / len(order)))[:padding]


class ElasticEpochProgress(L.Callback):
    """After a mid-epoch resume on another number of ranks: Lightning counts the epoch's batches per rank, and the
    count it restored is that of the old ranks. Set it so that the epoch ends exactly when the new ranks' shares
    (``ResumableSampler.remaining_share``) do: with more ranks than before, the old count would end the epoch
    before they were done; with fewer, the data ran out first anyway."""

    def on_train_start(self, trainer, pl_module) -> None:
        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        if not isinstance(sampler, ResumableSampler) or not sampler.elastic_resume:
            return
        sampler.elastic_resume = False
        if not trainer.fit_loop.restarted_mid_epoch:
            return
        share = len(sampler.remaining_share())
        left = share // loader.batch_size if loader.drop_last else math.ceil(share / loader.batch_size)
        done = max(0, int(trainer.num_training_batches) - left)
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        shift = done - progress.ready  # every counter moves by as much: Lightning restores them a step apart
        progress.ready, progress.started = progress.ready + shift, progress.started + shift
        progress.processed, progress.completed = progress.processed + shift, progress.completed + shift
        if trainer.is_global_zero:
            log.info("resumed on %d ranks mid-epoch: %d batches per rank left in this epoch", sampler.num_replicas, left)


def shuffled(dataset, trainer: L.Trainer | None = None, seed: int | None = None) -> ResumableSampler:
    """A shuffling sampler for ``dataset``, split over the ranks when a process group is up (it is by the time
    Lightning asks for the train DataLoader). Pass the DataModule's ``self.trainer``: a run resumed from an
    epoch-end checkpoint then starts at the epoch it continues with (Lightning's first batch is fetched before its
    ``set_epoch``, and with worker processes even the order is drawn then). The seed defaults to the run's
    (``PL_GLOBAL_SEED``, as Lightning's own sampler)."""
    seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else seed
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        sampler = ResumableSampler(dataset, shuffle=True, seed=seed)
    else:
        sampler = ResumableSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
    if trainer is not None:
        sampler.set_epoch(trainer.fit_loop.epoch_progress.current.processed)  # restored before this is called
    return sampler


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


def find_resume_checkpoint(run_dir: Path) -> str | None:
    """The checkpoint a requeued or restarted job should continue from, or None for a fresh start."""
    from aifactory_train.checkpoints import CHECKPOINT_DIR, is_checkpoint

    candidates = [p for p in run_dir.glob("hpc_ckpt_*.ckpt") if is_checkpoint(p)]
    last = run_dir / CHECKPOINT_DIR / "last.ckpt"
    if is_checkpoint(last):
        candidates.append(last)
    if not candidates:
        return None
    # the furthest step wins; not the newest file: a DeepSpeed checkpoint is a folder whose own mtime stays at its
    # creation while it is rewritten
    from aifactory_train.checkpoints import load_checkpoint_state

    def progress(path: Path) -> tuple[int, float]:
        return int(load_checkpoint_state(str(path)).get("global_step", -1)), path.stat().st_mtime

    return str(max(candidates, key=progress))


class JobStopped(BaseException):
    """Raised on every rank after the stop checkpoint is saved: the process ends without a summary, and the
    MLflow run stays open for the continuing job (``ckpt_path=auto``) to log into."""


class JobRequeued(JobStopped):
    """JobStopped, and the job was requeued with ``scontrol requeue``."""


class EnergyBudgetStop(JobStopped):
    """JobStopped because the run's measured energy reached ``energy.budget_kwh`` (aifactory_train.energy_budget)."""


class SignalCheckpoint(L.Callback):
    """Save ``hpc_ckpt_<n>.ckpt`` at the next optimizer-step boundary the ranks agree on (with gradient
    accumulation, not between two accumulated batches: see ``StepBoundary``), then stop, when a signal asks:

    * SIGTERM (preemption, ``scancel``, the time limit, ``kill``): save and stop. No requeue from here: Slurm
      requeues a preempted job itself (``--requeue``), and a cancelled one should stay cancelled.
    * the requeue signal, under Slurm (``--signal=USR1@<s>``, sent to every rank before the time limit): save,
      ``scontrol requeue`` the job, and stop.

    Why not Lightning's own handling: its auto-requeue saves from inside the signal handler, at whatever point the
    signal lands; a checkpoint taken in the middle of a step counts that step's batch as served but not trained,
    and the requeued run then ended one step short (measured: 119 of 120 steps). On SIGTERM Lightning stops after
    the step without saving at all. Saving between steps keeps the step count, data position and RNG states
    consistent. ``train.py`` turns Lightning's Slurm handler off (``SLURMEnvironment(auto_requeue=False)``); this
    callback's SIGTERM handler replaces Lightning's, and passes the signal on to ranks Lightning started itself.

    With several ranks the ranks agree through a small all-reduce (MAX of the flags) on a gloo group of its own,
    started at one boundary and read at the next: a signal is acted on one step later, at the same step on every
    rank, and the training step never waits for it. The blocking way (an all-reduce of a device tensor and
    ``.item()``) made every step wait for the GPU to finish before the host could queue the next one. For the
    same reason Lightning's own per-step SIGTERM broadcast (Lightning 2.6, ``_broadcast_sigterm_tensor``, a
    broadcast from rank 0 and ``.item()`` on the root device; Lightning issue #21487) is turned off while this
    callback runs: its flag is set only by Lightning's SIGTERM handler, which this callback's handler replaces, so it
    could only ever send 0. An epoch's last batch is skipped as a boundary (see ``periodic_checkpoint``); the
    epoch-end checkpoint is written right after it.
    """

    NONE, BUDGET, REQUEUE, TERMINATE = 0, 1, 2, 3  # the ranks agree on the largest; BUDGET: EnergyBudget asks

    def __init__(self, requeue_signal: int | None = None) -> None:
        self.requeue_signal = requeue_signal
        self.received = self.NONE
        self._group = None  # the ranks' gloo group for the decision; None with one rank
        self._pending = None  # (work, flags) of the all-reduce started at the last boundary
        self._boundary = StepBoundary()  # boundaries are optimizer steps: accumulated gradients are in no checkpoint

    def on_train_start(self, trainer, pl_module) -> None:
        import signal

        def on_requeue(signum, frame) -> None:
            self.received = max(self.received, self.REQUEUE)

        def on_terminate(signum, frame) -> None:
            self.received = self.TERMINATE
            launcher = trainer.strategy.launcher
            if launcher is not None and hasattr(launcher, "kill"):  # ranks Lightning started as our children
                launcher.kill(signum)

        if self.requeue_signal is not None:
            signal.signal(self.requeue_signal, on_requeue)
        signal.signal(signal.SIGTERM, on_terminate)
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            # every rank calls this here, as new_group requires; gloo, so the flags never touch the GPU
            self._group = torch.distributed.new_group(backend="gloo")
            epoch_loop = trainer.fit_loop.epoch_loop
            if hasattr(epoch_loop, "_broadcast_sigterm_tensor"):  # see the class docstring
                epoch_loop._broadcast_sigterm_tensor = lambda: None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._boundary.batch_started(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if is_epoch_last_batch(trainer) or not self._boundary.stepped(trainer):
            return
        decision = self.received if self._group is None else self._agreed_decision()
        if decision == self.NONE:
            return
        self._finish_pending()
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(path)
        if decision == self.TERMINATE:
            raise JobStopped(str(path))
        if decision == self.BUDGET:
            raise EnergyBudgetStop(str(path))
        if trainer.is_global_zero:
            import subprocess

            job = os.environ.get("SLURM_JOB_ID", "")
            if os.environ.get("SLURM_ARRAY_JOB_ID"):
                job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"saved {path}, but `scontrol requeue {job}` failed ({result.returncode}): "
                                   f"{result.stderr.strip()}; resubmit the same `aift launch` (ckpt_path=auto resumes)")
        raise JobRequeued(str(path))

    def on_train_end(self, trainer, pl_module) -> None:
        self._finish_pending()

    def _agreed_decision(self) -> int:
        """What the ranks agreed on at the last boundary (NONE at the first), and this boundary's flags sent off.
        Every rank calls this at the same boundaries, so the all-reduces pair up and all ranks read the same
        decision; the flags are a CPU tensor, so reading the result waits for no device."""
        decision = self.NONE
        if self._pending is not None:
            work, flags = self._pending
            work.wait()
            decision = int(flags.item())
        flags = torch.tensor([self.received], dtype=torch.int32)
        work = torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=self._group, async_op=True)
        self._pending = (work, flags)
        return decision

    def _finish_pending(self) -> None:
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None

