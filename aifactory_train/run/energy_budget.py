"""``energy.budget_kwh``: stop a run cleanly once its measured energy reaches a budget.

The energy is the run's own measurement (aifactory_train.records.energy: the counters' files in ``<run>/energy``, every job
start of the run added, a resumed or requeued one included). At most every ``CHECK_EVERY_S`` seconds each rank
rereads its own counters and adds up the run's files; when the total reaches the budget it asks
``SignalCheckpoint`` to stop. The ranks agree on the stop as on a signal (the largest request wins), at an optimizer
step boundary, where ``hpc_ckpt_<n>.ckpt`` is saved: ``ckpt_path=auto`` resumes from it (with a larger budget, or
none; with the same budget the run stops again at once, as the energy already spent counts).

Other ranks' files are up to ``energy.sample_every_s`` old when a rank reads them, so the stop can come that much
energy late; the counters themselves are integrated by the hardware (nothing between reads is lost).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L

log = logging.getLogger(__name__)

CHECK_EVERY_S = 1.0  # a counter read costs microseconds (benchmarks/results/energy-sample_*); the files a few ms


class EnergyBudget(L.Callback):
    """Ask ``signal_checkpoint`` to stop (``SignalCheckpoint.BUDGET``) when the run's energy reaches ``budget_kwh``."""

    def __init__(self, budget_kwh: float, meter, signal_checkpoint, run_dir: Path,
                 check_every_s: float = CHECK_EVERY_S) -> None:
        self.budget_kwh = budget_kwh
        self.meter = meter  # the run's EnergyMeter: its ledgers are this process's counters
        self.signal_checkpoint = signal_checkpoint
        self.run_dir = Path(run_dir)
        self.check_every_s = check_every_s
        self._last_check = float("-inf")
        self.kwh_at_stop: float | None = None

    def kwh_so_far(self) -> float | None:
        from aifactory_train.records.energy import JOULES_PER_KWH, read_run_energy

        for ledger in self.meter.ledgers:
            ledger.sample()  # this process's counters now, not up to sample_every_s ago
        total = read_run_energy(self.run_dir)
        if total is None or not total.by_meter:
            return None
        return sum(t.joules for t in total.by_meter.values()) / JOULES_PER_KWH

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.monotonic()
        if now - self._last_check < self.check_every_s or self.kwh_at_stop is not None:
            return
        self._last_check = now
        kwh = self.kwh_so_far()
        if kwh is not None and kwh >= self.budget_kwh:
            self.kwh_at_stop = kwh
            self.signal_checkpoint.received = max(self.signal_checkpoint.received, self.signal_checkpoint.BUDGET)
            log.info("energy: %.6f kWh measured, energy.budget_kwh=%s reached: stopping at the next step boundary",
                     kwh, self.budget_kwh)


def no_counter_reason(budget_kwh: float | None, meters: tuple[str, ...], reason: str | None) -> str | None:
    """A budget needs a counter to measure against: why this run has none, or None."""
    if budget_kwh is None or meters:
        return None
    return (f"config key 'energy.budget_kwh': {budget_kwh} needs a measured energy, but this run reads no counter "
            f"({reason or 'energy.meter=none'}); valid here: null (no budget), or a machine with an energy counter")


def budget_summary(budget_kwh: float, callback: EnergyBudget | None, energy: dict[str, Any], checkpoint: str,
                   global_step: int) -> dict[str, Any]:
    """The ``energy_budget`` entry of summary.json."""
    return {"budget_kwh": budget_kwh, "stopped": callback is not None and callback.kwh_at_stop is not None,
            "kwh_at_stop": callback.kwh_at_stop if callback is not None else None,
            "kwh_total": energy.get("kwh") if energy.get("measured") else None,
            "checkpoint": checkpoint, "global_step": global_step,
            "resume": "the same command with ckpt_path=auto and a larger energy.budget_kwh (or null) continues"}


def run_samples(summary: dict[str, Any], resumed: bool) -> tuple[float | None, float | None, str]:
    """(training samples, tokens, how counted) of the whole run, to divide the run's energy by. A run in one job
    counted them; a resumed run's energy covers every job, so its samples are the optimizer steps x the global
    batch (each full), and its tokens the samples x this job's tokens per sample."""
    samples, tokens = summary.get("train_samples"), summary.get("train_tokens")
    if not resumed:
        return samples, tokens, "counted"
    batch = (summary.get("batch") or {}).get("global")
    if not batch:
        return None, None, "unknown"
    run = summary["global_step"] * batch
    per_sample = tokens / samples if tokens and samples else None
    return run, (run * per_sample if per_sample else None), "optimizer steps x global batch"


def energy_per_sample(energy: dict[str, Any], samples: float | None, tokens: float | None, how: str) -> dict[str, Any]:
    """Joules per training sample (and per token) where a counter was read: the run's whole measured energy
    (validation and test included) over the samples it trained on."""
    if not energy.get("measured") or not samples:
        return {}
    out = {"joules_per_sample": energy["joules"] / samples, "samples_counted": how}
    if tokens:
        out["joules_per_token"] = energy["joules"] / tokens
    return out
