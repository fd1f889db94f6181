"""Callbacks every recipe gets."""

from __future__ import annotations

import time

import lightning as L


def batch_size_of(batch) -> int:
    """Samples in a batch: the leading dim of the first tensor (images/tokens), or the length of a list
    (detection targets)."""
    first = batch[0] if isinstance(batch, (tuple, list)) else batch
    if isinstance(first, dict):
        first = next(iter(first.values()))
    if hasattr(first, "shape"):
        return int(first.shape[0])
    return len(first)


class TrainingThroughput(L.Callback):
    """Samples and seconds spent in training batches for summary.json's ``train_samples_per_s``.

    Lightning's ThroughputMonitor logs per-step throughput to the logger but keeps no run total; this
    counts the whole fit, from the first training batch request to the last optimizer step, leaving out
    validation (data loading time is included: it is part of what a user waits for).
    """

    def __init__(self) -> None:
        self.samples = 0
        self.seconds = 0.0
        self._epoch_start: float | None = None
        self._paused_at: float | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.samples += batch_size_of(batch) * trainer.world_size  # every rank trains a batch of this size

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and self._epoch_start is not None:
            self.seconds += time.perf_counter() - self._epoch_start
            self._epoch_start = None

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._epoch_start is not None:
            self.seconds += time.perf_counter() - self._epoch_start
            self._epoch_start = None

    @property
    def samples_per_s(self) -> float | None:
        return self.samples / self.seconds if self.seconds > 0 else None
