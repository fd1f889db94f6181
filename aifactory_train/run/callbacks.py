"""Callbacks every recipe gets."""

from __future__ import annotations

import logging
import time

import lightning as L
import torch

log = logging.getLogger(__name__)


def batch_size_of(batch) -> int:
    """Samples in a batch: the leading dim of the first tensor (images/tokens), or the length of a list
    (detection targets)."""
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    if isinstance(first, dict):
        first = next(iter(first.values()))
    if hasattr(first, "shape"):
        return int(first.shape[0])
    return len(first)


def precision_dtype(precision: str) -> torch.dtype:
    if "bf16" in precision:
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


class TrainingThroughput(L.Callback):
    """Training samples/s, FLOP/s and MFU to the logger, and the run totals for summary.json.

    Why not Lightning's ThroughputMonitor: it calls ``torch.cuda.synchronize()`` after every batch, so
    the CPU can no longer queue the next step while the GPU works; that costs throughput exactly where
    it is measured. This callback synchronises only on logging steps and still uses Lightning's
    ``Throughput`` for the arithmetic (windowed rates, FLOP/s, MFU from ``get_available_flops``).
    FLOPs come from the module's ``flops_per_sample`` (measured with ``measure_flops``), when it has one.
    Language models also count tokens: a module with ``tokens_in_batch(batch)`` gets tokens/s (and FLOPs from
    ``flops_per_token`` x tokens, since rows differ in length).
    Time spent in validation is left out; data loading is included (it is part of what a user waits for).
    """

    def __init__(self, log_every_n_steps: int = 10, window_size: int = 2) -> None:
        self.log_every_n_steps = log_every_n_steps
        self.window_size = window_size
        self.samples = 0  # over all ranks
        self.tokens: int | None = None  # over all ranks, for modules that count tokens
        self._local_tokens = 0
        self.seconds = 0.0
        self._local_samples = 0
        self._batches = 0
        self._flops_since_update = 0
        self._epoch_start: float | None = None
        self._throughput = None

    @property
    def samples_per_s(self) -> float | None:
        return self.samples / self.seconds if self.seconds > 0 else None

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.tokens is not None and self.seconds > 0 else None

    def _train_seconds(self) -> float:
        running = time.perf_counter() - self._epoch_start if self._epoch_start is not None else 0.0
        return self.seconds + running

    def on_train_start(self, trainer, pl_module) -> None:
        from lightning.fabric.utilities.throughput import Throughput, get_available_flops

        device = trainer.strategy.root_device
        available = None
        if device.type == "cuda":
            available = get_available_flops(device, precision_dtype(str(trainer.precision)))
        self._throughput = Throughput(available_flops=available, world_size=trainer.world_size,
                                      window_size=self.window_size)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._epoch_start is None:  # a run resumed mid-epoch starts here, without on_train_epoch_start
            self._epoch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        size = batch_size_of(batch)
        self.samples += size * trainer.world_size
        self._local_samples += size
        self._batches += 1
        count_tokens = getattr(pl_module, "tokens_in_batch", None)
        tokens = count_tokens(batch) if count_tokens is not None else None
        if tokens is not None:
            self._local_tokens += tokens
        per_sample = getattr(pl_module, "flops_per_sample", None)
        per_token = getattr(pl_module, "flops_per_token", None)
        if per_token and tokens is not None:
            flops = per_token * tokens
        else:
            flops = per_sample * size if per_sample else None
        if flops:
            self._flops_since_update += flops
        if trainer.logger is None or trainer.global_step % self.log_every_n_steps != 0:
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()  # only here: the elapsed time must include the queued GPU work
        self._throughput.update(time=self._train_seconds(), batches=self._batches, samples=self._local_samples,
                                lengths=self._local_tokens if tokens is not None else None,
                                flops=self._flops_since_update if flops else None)
        self._flops_since_update = 0
        metrics = {k.replace("items_per_sec", "tokens_per_sec").replace("lengths", "tokens"): v
                   for k, v in self._throughput.compute().items()}
        if metrics and trainer.is_global_zero:
            trainer.logger.log_metrics({f"throughput/{k}": v for k, v in metrics.items()}, step=trainer.global_step)

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and self._epoch_start is not None:
            self.seconds += time.perf_counter() - self._epoch_start
            self._epoch_start = None

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._epoch_start = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        if hasattr(pl_module, "tokens_in_batch"):
            local = torch.tensor(float(self._local_tokens), device=pl_module.device)
            self.tokens = int(trainer.strategy.reduce(local, reduce_op="sum"))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._epoch_start is not None:
            self.seconds += time.perf_counter() - self._epoch_start
            self._epoch_start = None


class EnergyMeter(L.Callback):
    """Reads this process's energy counters from the start of fit to ``finish()`` (after the test stage), into
    ``<run>/energy`` (see :mod:`aifactory_train.records.energy`). It starts in ``setup``, which every rank runs after it is
    launched and has its device."""

    def __init__(self, meters: tuple[str, ...], energy_cfg: dict, run_dir) -> None:
        self.meters = meters  # set once the device is known (aifactory_train.records.energy.check_meter)
        self.energy_cfg = energy_cfg
        self.run_dir = run_dir
        self.ledgers: list = []
        self.started = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or self.started:
            return
        self.started = True
        from pathlib import Path

        from aifactory_train.records.energy import ENERGY_DIR, open_ledger, record_failure

        for meter in self.meters:
            try:
                ledger = open_ledger(meter, self.energy_cfg, self.run_dir, trainer)
                if ledger is not None:
                    ledger.start()
                    self.ledgers.append(ledger)
            except Exception as err:  # noqa: BLE001 - e.g. a MIG slice without a counter: train on, and say so
                log.warning("energy: rank %d cannot read its %s counter (%s); the run's total leaves it out",
                            trainer.global_rank, meter, err)
                record_failure(Path(self.run_dir) / ENERGY_DIR, meter, trainer.global_rank, err)

    def finish(self) -> None:
        for ledger in self.ledgers:
            ledger.stop()


def best_and_last_checkpoint(**kwargs):
    """Lightning's ModelCheckpoint (best-k by the monitor), whose ``last.ckpt`` is the state at the end of every
    epoch and at the end of fit, whatever the monitor does.

    Lightning 2.6 writes ``last.ckpt`` only in a step where it also wrote a top-k checkpoint (and at the end of fit
    only if it never wrote one). A run whose metric stopped improving kept a ``last.ckpt`` of its best epoch, so
    ``ckpt_path=last`` resumed from there and ``aift export .../last.ckpt`` shipped stale weights. Measured: a
    3-epoch run whose metric stopped improving after epoch 1 left ``last.ckpt`` at step 25 of 75."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.trainer.states import TrainerFn

    class BestAndLastCheckpoint(ModelCheckpoint):
        @property
        def state_key(self) -> str:  # ModelCheckpoint's, so checkpoints written before this class still resume
            return "ModelCheckpoint" + super().state_key.removeprefix(type(self).__qualname__)

        def _save_last_if_stale(self, trainer) -> None:
            if (trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING
                    or not trainer.global_step or self._last_global_step_saved == trainer.global_step):
                return  # nothing trained, or this step's state was just saved (top-k and last together)
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            super().on_train_epoch_end(trainer, pl_module)
            if self._should_save_on_train_epoch_end(trainer):
                self._save_last_if_stale(trainer)

        def on_validation_end(self, trainer, pl_module) -> None:
            super().on_validation_end(trainer, pl_module)
            # at the epoch's end only: a validation inside an epoch (val_check_interval < 1) may sit in the middle
            # of an accumulated step, which no checkpoint can hold
            if (not self._should_save_on_train_epoch_end(trainer)
                    and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch):
                self._save_last_if_stale(trainer)

        def on_train_end(self, trainer, pl_module) -> None:
            super().on_train_end(trainer, pl_module)
            self._save_last_if_stale(trainer)  # e.g. max_steps or a stop in the middle of an epoch

    return BestAndLastCheckpoint(save_last=True, **kwargs)
