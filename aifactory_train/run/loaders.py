"""The recipes' DataLoader: where a run resumed mid-epoch continues, and the same augmentation whichever worker
draws a sample.

* **Data position**: ``ResumableDataLoader`` is torchdata's ``StatefulDataLoader``; Lightning saves its state
  (sampler order, batches already served, worker states) in the checkpoint and restores it, so a run resumed
  mid-epoch continues with the next batch instead of replaying the epoch.
* **Augmentation in DataLoader workers**: no checkpoint can hold the workers' RNG states (they have drawn ahead
  for prefetched batches). ``ResumableDataLoader`` instead seeds torch, numpy and ``random`` for each sample from
  (seed, epoch, sample index) while the dataset reads it (``SeededSamples``), so a sample's augmentation is the
  same whichever worker makes it, whenever, and however many workers there are.
* **Elastic resume**: ``ResumableSampler`` and ``ElasticEpochProgress`` finish an interrupted epoch exactly when
  the job comes back on another number of ranks.

The rest of an exact resume: ``resume_state`` (RNG states, atomic checkpoint files, step boundaries) and
``preemption`` (signals, Slurm requeue).
"""

from __future__ import annotations

import logging
import math
import os
import random
import warnings
from typing import Any

import lightning as L
import numpy as np
import torch
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
    the image classification recipe's 2 workers: 210 of 244 weight tensors other than the uninterrupted run's). Seeded per sample,
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
