"""Assembling the Lightning Trainer of a training run: one function, ``build_trainer``, turns the resolved config
into every argument the Trainer takes (strategy, precision, plugins, callbacks, logger, profiler), so the whole of
what a run is made of is in one place.

The callbacks every run gets, and why:

* ``best_and_last_checkpoint``: ``best-*.ckpt`` on the recipe's monitor, ``last.ckpt`` at every epoch end;
* ``TrainingThroughput``: samples (and tokens) per second, for the summary and MLflow;
* ``EnergyMeter``: the run's energy ledger (its meters are chosen once the device is known);
* ``StrategyConfigFile``: the DeepSpeed JSON as DeepSpeed received it;
* ``RNGStateCallback`` and ``ElasticEpochProgress``: exact resume (``resume_state``, ``loaders``);
* the provenance callback: which data, weights, run and software, in every checkpoint;
* ``SignalCheckpoint``: save and stop (or requeue) at a step boundary on SIGTERM or Slurm's requeue signal;
* optionally ``periodic_checkpoint`` (``checkpoint.every_n_*``), ``EarlyStopping`` (``early_stopping.patience``)
  and ``LearningRateMonitor`` (with a tracker).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROFILER_DIR = "profiler"


def zero_stage(trainer) -> int | None:
    config = getattr(trainer.strategy, "config", None)
    return (config or {}).get("zero_optimization", {}).get("stage") if isinstance(config, dict) else None


def peak_device_memory_gib(trainer) -> float | None:
    """This rank's peak of memory allocated by torch on its GPU (None on CPU)."""
    import torch

    device = trainer.strategy.root_device
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def profiler_for(name: str, folder: Path):
    """Lightning's profiler ``name`` writing its report into ``folder`` (Lightning's own default prints it and
    keeps no file). ``pytorch``: torch.profiler's operator table and Chrome/Perfetto traces of a few steps of
    each stage (Lightning's schedule: wait 1, warm up 1, record 3; an epoch needs 5 training steps for a training
    trace), with operator input shapes."""
    from lightning.pytorch.profilers import AdvancedProfiler, PyTorchProfiler, SimpleProfiler

    if name == "pytorch":
        return PyTorchProfiler(dirpath=folder, filename="profile", export_to_chrome=True, record_shapes=True,
                               row_limit=40)
    return {"simple": SimpleProfiler, "advanced": AdvancedProfiler}[name](dirpath=folder, filename="profile")


def early_stopping_summary(callback) -> dict[str, Any] | None:
    """Whether early stopping ended the run, and Lightning's own words for why; None when it was off."""
    if callback is None:
        return None
    reason = callback.stopping_reason.name.lower()  # e.g. patience_exhausted, non_finite_metric
    stopped = reason != "not_stopped"
    return {"stopped": stopped, "reason": reason,
            "message": callback.stopping_reason_message, "epoch": callback.stopped_epoch if stopped else None}


def batch_plan(resolved: dict[str, Any], ranks: int) -> dict[str, Any]:
    """Samples per optimizer step: per device x accumulated batches x ranks. With ``trainer.global_batch_size`` the
    accumulation is derived (ConfigError where no whole number fits, e.g. ``devices: auto`` found 3 GPUs)."""
    from aifactory_train.records.config import gradient_accumulation

    per_device = (resolved.get("data") or {}).get("batch_size")
    wanted = resolved["trainer"].get("global_batch_size")
    accumulate = resolved["trainer"]["accumulate_grad_batches"]
    if wanted is not None:
        accumulate = gradient_accumulation(wanted, per_device, ranks)
    return {"per_device": per_device, "accumulate_grad_batches": accumulate, "ranks": ranks,
            "global": per_device * accumulate * ranks if per_device else None,
            "global_fixed": wanted is not None}


def strategy_config_file(run_dir: Path):
    """A callback that writes the DeepSpeed JSON as DeepSpeed received it (after Lightning added precision,
    clipping, accumulation and batch size) to <run>/deepspeed_config.json, so a run says exactly how it was
    sharded. Built here because Lightning is imported lazily."""
    import lightning as L

    class StrategyConfigFile(L.Callback):
        def on_fit_start(self, trainer, pl_module) -> None:
            config = getattr(trainer.strategy, "config", None)
            if trainer.is_global_zero and isinstance(config, dict):
                (run_dir / "deepspeed_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    return StrategyConfigFile()


@dataclass
class TrainerParts:
    """The trainer, the callbacks the run reads back after fit, and the batch plan it runs with."""

    trainer: Any
    checkpoint: Any  # best_and_last_checkpoint
    throughput: Any  # TrainingThroughput
    energy: Any  # EnergyMeter
    provenance: Any  # the provenance callback
    early_stopping: Any | None
    budget: Any | None  # EnergyBudget, with energy.budget_kwh
    batch: dict[str, Any]


def trainer_arguments(resolved: dict[str, Any], run_dir: Path, logger) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every keyword argument of ``lightning.Trainer`` for this run, and the callbacks by name (see the module
    docstring for each)."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    from aifactory_train import slurm_env
    from aifactory_train.run.callbacks import EnergyMeter, TrainingThroughput, best_and_last_checkpoint
    from aifactory_train.run.checkpoints import CHECKPOINT_DIR
    from aifactory_train.run.loaders import ElasticEpochProgress
    from aifactory_train.run.preemption import SignalCheckpoint
    from aifactory_train.run.provenance import provenance_callback
    from aifactory_train.run.resume_state import AtomicCheckpointIO, RNGStateCallback, periodic_checkpoint
    from aifactory_train.run.strategies import strategy_callbacks, trainer_kwargs

    recipe = resolved["recipe"]
    named = {
        "checkpoint": best_and_last_checkpoint(  # last.ckpt: the state at every epoch end and at the end of fit
            dirpath=run_dir / CHECKPOINT_DIR,
            filename="best-epoch{epoch}-step{step}",
            auto_insert_metric_name=False,
            monitor=recipe["monitor"],
            mode=recipe["monitor_mode"],
            # last.ckpt is always the newest state, also after a resume from a moved/copied run folder
            # (with the counter Lightning would write last-v1.ckpt next to a stale last.ckpt).
            enable_version_counter=False,
        ),
        "throughput": TrainingThroughput(log_every_n_steps=resolved["trainer"]["log_every_n_steps"]),
        "energy": EnergyMeter((), resolved["energy"], run_dir),
        "provenance": provenance_callback(),
        "early_stopping": None,
        "budget": None,
    }
    callbacks = [named["checkpoint"], named["throughput"], named["energy"], strategy_config_file(run_dir),
                 RNGStateCallback(), ElasticEpochProgress(), named["provenance"]]
    periodic = resolved["checkpoint"]
    if periodic["every_n_train_steps"] or periodic["every_n_minutes"]:
        # last.ckpt during the epoch too; best-* stays with the monitor above
        callbacks.append(periodic_checkpoint(run_dir / CHECKPOINT_DIR, periodic["every_n_train_steps"],
                                             periodic["every_n_minutes"]))
    if resolved["early_stopping"]["patience"]:
        from lightning.pytorch.callbacks import EarlyStopping

        # its state (best score, validations waited) is in the checkpoint, so a resumed run keeps counting
        named["early_stopping"] = EarlyStopping(monitor=recipe["monitor"], mode=recipe["monitor_mode"],
                                                patience=resolved["early_stopping"]["patience"],
                                                min_delta=resolved["early_stopping"]["min_delta"])
        callbacks.append(named["early_stopping"])
    if logger is not None:
        callbacks.append(LearningRateMonitor(logging_interval="step"))

    kwargs = trainer_kwargs(resolved["trainer"], resolved["strategy"])
    if kwargs.get("profiler"):
        kwargs["profiler"] = profiler_for(kwargs["profiler"], run_dir / PROFILER_DIR)
    callbacks += strategy_callbacks(kwargs)
    plugins = []
    if resolved["strategy"]["name"] != "deepspeed":  # DeepSpeed writes its checkpoint folders itself
        plugins.append(AtomicCheckpointIO())
    requeue_signal = None
    if slurm_env.in_slurm_job():  # our requeue (between steps) instead of Lightning's (inside the handler)
        from lightning.pytorch.plugins.environments import SLURMEnvironment

        plugins.append(SLURMEnvironment(auto_requeue=False))
        requeue_signal = slurm_env.REQUEUE_SIGNAL
    signal_checkpoint = SignalCheckpoint(requeue_signal)
    if resolved["energy"].get("budget_kwh") is not None:  # before SignalCheckpoint: it stops at the same boundary
        from aifactory_train.run.energy_budget import EnergyBudget

        named["budget"] = EnergyBudget(resolved["energy"]["budget_kwh"], named["energy"], signal_checkpoint, run_dir)
        callbacks.append(named["budget"])
    callbacks.append(signal_checkpoint)
    kwargs.update(plugins=plugins, callbacks=callbacks, logger=logger if logger is not None else False,
                  default_root_dir=run_dir)
    return kwargs, named


def build_trainer(resolved: dict[str, Any], run_dir: Path, logger) -> TrainerParts:
    """The run's Trainer, built once from ``trainer_arguments``. The accumulation follows from the batch plan,
    which needs the rank count the Trainer found (``devices: auto``); it is set before fit reads it."""
    import lightning as L

    from aifactory_train.records.energy import check_meter

    kwargs, named = trainer_arguments(resolved, run_dir, logger)
    trainer = L.Trainer(**kwargs)
    batch = batch_plan(resolved, trainer.world_size)
    trainer.accumulate_grad_batches = batch["accumulate_grad_batches"]  # read by the loop (and DeepSpeed) in fit
    energy = named["energy"]
    energy.meters, energy.reason = check_meter(resolved["energy"], on_gpu=trainer.strategy.root_device.type == "cuda")
    from aifactory_train.run.energy_budget import no_counter_reason

    if (unmeasurable := no_counter_reason(resolved["energy"].get("budget_kwh"), energy.meters, energy.reason)):
        from aifactory_train.errors import ConfigError

        raise ConfigError(unmeasurable)  # a budget needs a counter
    return TrainerParts(trainer=trainer, batch=batch, **named)
