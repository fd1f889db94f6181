"""The training entry every recipe shares: validate, track, build from config, fit, test, summarise.

Everything use-case specific is built from config with ``hydra.utils.instantiate``: the DataModule from
``data._target_`` and the LightningModule from ``recipe.module._target_``. The recipe contract:

* the DataModule has ``data_info`` (a dict the module needs, e.g. ``class_names``), ``lineage()``
  (an :class:`aifactory_train.lineage.DatasetLineage`) and ``has_split(name)``; when what it prepares depends on
  the checkpoint (a tokenizer), also ``adopt_checkpoint(path)``, called before ``setup`` on resume and in eval;
* the LightningModule takes ``model``, ``optim``, ``loss`` and ``data_info`` keyword arguments, keeps
  ``data_info`` in its hyperparameters and its torch model in ``self.net``, and writes its reports
  (plots, tables) into ``<run dir>/reports``;
* the recipe's schema (``recipe.schema``) may give its ``data`` section a ``check_files(stage)`` that checks,
  without reading them, that the files the config names for ``stage`` ("fit" or "eval") are there: run by
  ``aift train``, ``aift eval`` and ``aift launch`` before anything is tracked or queued;
* optionally, the LightningModule has ``export_model(format, out_dir, options)`` for ``aift export``, and
  ``PREDICT_EXTENSIONS`` with ``predict_files(files, batch_size, options)`` for ``aift predict``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
SUMMARY_SCHEMA_VERSION = 1


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return dict(sorted(out.items()))


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    """Write summary.json atomically (a reader never sees half a file)."""
    path = run_dir / SUMMARY_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def zero_stage(trainer) -> int | None:
    config = getattr(trainer.strategy, "config", None)
    return (config or {}).get("zero_optimization", {}).get("stage") if isinstance(config, dict) else None


def use_hydra_logging() -> None:
    """Lightning adds its own console handler; under Hydra the root logger already prints and writes the
    run's log file, so drop Lightning's to avoid every line appearing twice."""
    root = logging.getLogger()
    if root.handlers:
        lightning_logger = logging.getLogger("lightning")
        for handler in list(lightning_logger.handlers):
            lightning_logger.removeHandler(handler)


def _strategy_config_file_callback():
    import lightning as L

    class StrategyConfigFile(L.Callback):
        """Write the DeepSpeed JSON as DeepSpeed received it (after Lightning added precision, clipping,
        accumulation and batch size) to <run>/deepspeed_config.json, so a run says exactly how it was sharded."""

        def __init__(self, run_dir: Path):
            self.run_dir = run_dir

        def on_fit_start(self, trainer, pl_module) -> None:
            config = getattr(trainer.strategy, "config", None)
            if trainer.is_global_zero and isinstance(config, dict):
                (self.run_dir / "deepspeed_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    return StrategyConfigFile


def _peak_device_memory_gib(trainer) -> float | None:
    """This rank's peak of memory allocated by torch on its GPU (None on CPU)."""
    import torch

    device = trainer.strategy.root_device
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


PROFILER_DIR = "profiler"


def _profiler(name: str, folder: Path):
    """Lightning's profiler ``name`` writing its report into ``folder`` (Lightning's own default prints it and
    keeps no file). ``pytorch``: torch.profiler's operator table and Chrome/Perfetto traces of a few steps of
    each stage (Lightning's schedule: wait 1, warm up 1, record 3; an epoch needs 5 training steps for a training
    trace), with operator input shapes."""
    from lightning.pytorch.profilers import AdvancedProfiler, PyTorchProfiler, SimpleProfiler

    if name == "pytorch":
        return PyTorchProfiler(dirpath=folder, filename="profile", export_to_chrome=True, record_shapes=True,
                               row_limit=40)
    return {"simple": SimpleProfiler, "advanced": AdvancedProfiler}[name](dirpath=folder, filename="profile")


def _early_stopping_summary(callback) -> dict[str, Any] | None:
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
    from aifactory_train.config import gradient_accumulation

    per_device = (resolved.get("data") or {}).get("batch_size")
    wanted = resolved["trainer"].get("global_batch_size")
    accumulate = resolved["trainer"]["accumulate_grad_batches"]
    if wanted is not None:
        accumulate = gradient_accumulation(wanted, per_device, ranks)
    return {"per_device": per_device, "accumulate_grad_batches": accumulate, "ranks": ranks,
            "global": per_device * accumulate * ranks if per_device else None,
            "global_fixed": wanted is not None}


def _budget_stopped(stopped, budget, resolved, run_dir: Path, trainer, tracker, ckpt_path, energy_reason):
    """energy.budget_kwh stopped the run at a step boundary, after saving ``stopped``'s checkpoint: summary.json says
    so (status ``stopped_energy_budget``), the energy goes to MLflow, and the MLflow run stays open for the job that
    resumes it (``ckpt_path=auto``)."""
    from aifactory_train.energy import summarize
    from aifactory_train.energy_budget import budget_summary, energy_per_sample, run_samples
    from aifactory_train.tracking import is_global_zero

    tracker.stop_system_metrics()
    log.info("stopped by energy.budget_kwh=%s after saving %s; ckpt_path=auto with a larger budget continues",
             resolved["energy"]["budget_kwh"], stopped)
    outcome = {"status": "stopped_energy_budget", "checkpoint": str(stopped)}
    if not is_global_zero():
        return outcome
    batch = batch_plan(resolved, trainer.world_size)
    partial = {"global_step": trainer.global_step, "batch": batch}
    energy = summarize(run_dir, energy_reason)
    samples, _, how = run_samples({**partial, "train_samples": None}, True)
    energy.update(energy_per_sample(energy, samples, None, how))
    summary = {
        "schema_version": SUMMARY_SCHEMA_VERSION, "status": "stopped_energy_budget",
        "recipe": resolved["recipe"]["name"], "task": resolved["recipe"]["task"], "model": resolved["model"]["name"],
        "output_dir": str(run_dir.resolve()), "tracking_uri": tracker.recorded_uri, "mlflow_run_id": tracker.run_id,
        "resumed_from": ckpt_path, "global_step": trainer.global_step, "epochs": trainer.current_epoch,
        "batch": batch, "checkpoint": str(stopped), "energy": energy,
        "energy_budget": budget_summary(resolved["energy"]["budget_kwh"], budget, energy, str(stopped),
                                        trainer.global_step),
    }
    if energy["measured"]:
        tracker.log_metrics({f"energy/{k}": energy[k] for k in ("kwh", "joules", "joules_per_sample")
                             if energy.get(k) is not None}, step=trainer.global_step)
    tracker.set_tags({"aift.stopped": "energy_budget"})
    path = write_summary(run_dir, summary)
    print(f"stopped: energy.budget_kwh={resolved['energy']['budget_kwh']} reached at step {trainer.global_step}; "
          f"checkpoint {stopped}; summary: {path}")
    return outcome


def run_training(cfg) -> dict[str, Any]:
    """Train the configured recipe; return the summary (also written to <run dir>/summary.json)."""
    started = time.time()
    from omegaconf import OmegaConf

    from aifactory_train.config import build, check_data, validate
    from aifactory_train.usage_terms import usage_tags

    typed = validate(cfg)  # types and names, before any data is read or tracking run created
    usage = check_data(typed)  # the data files are there and the owner's terms allow this run: fails in a second
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)

    from aifactory_train.checkpoints import CHECKPOINT_DIR, check_data_matches, resolve_checkpoint
    from aifactory_train.tracking import Tracker

    ckpt_path = resolve_checkpoint(cfg.ckpt_path, run_dir)  # ckpt_path=auto: None on a first start
    unverified = []
    if ckpt_path and Path(ckpt_path).is_dir():  # DeepSpeed unpickles its shards with weights_only=False
        from aifactory_train.checkpoints import TRUST_RESUME, verify_deepspeed_checkpoint

        unverified = verify_deepspeed_checkpoint(ckpt_path, resolved["checkpoint"]["trust"], TRUST_RESUME)
    tracker = Tracker(resolved["tracking"], run_dir, resume=ckpt_path is not None)

    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor

    from aifactory_train.callbacks import EnergyMeter, TrainingThroughput, best_and_last_checkpoint
    from aifactory_train.resume import (AtomicCheckpointIO, ElasticEpochProgress, JobRequeued, JobStopped,
                                        RNGStateCallback, SignalCheckpoint, periodic_checkpoint)
    from aifactory_train.provenance import provenance_callback, training_provenance
    from aifactory_train.strategies import strategy_callbacks, trainer_kwargs

    StrategyConfigFile = _strategy_config_file_callback()
    from aifactory_train.tracking import is_global_zero

    use_hydra_logging()
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build(cfg.data, _convert_="all")
    if ckpt_path and hasattr(datamodule, "adopt_checkpoint"):
        datamodule.adopt_checkpoint(ckpt_path)  # e.g. the tokenizer the checkpoint was trained with
    datamodule.setup("fit")
    if ckpt_path:
        check_data_matches(ckpt_path, datamodule.data_info)
        log.info("resuming from %s", ckpt_path)
    module = build(
        cfg.recipe.module,
        model=resolved["model"],
        optim=resolved["optim"],
        loss=resolved["loss"],
        data_info=datamodule.data_info,
        _convert_="all",
    )

    recipe = resolved["recipe"]
    checkpoint = best_and_last_checkpoint(  # last.ckpt: the state at every epoch end and at the end of fit
        dirpath=run_dir / CHECKPOINT_DIR,
        filename="best-epoch{epoch}-step{step}",
        auto_insert_metric_name=False,
        monitor=recipe["monitor"],
        mode=recipe["monitor_mode"],
        # last.ckpt is always the newest state, also after a resume from a moved/copied run folder
        # (with the counter Lightning would write last-v1.ckpt next to a stale last.ckpt).
        enable_version_counter=False,
    )
    throughput = TrainingThroughput(log_every_n_steps=resolved["trainer"]["log_every_n_steps"])
    energy = EnergyMeter((), resolved["energy"], run_dir)  # its meters are chosen once the device is known
    provenance = provenance_callback()  # which data, weights, run and software: in every checkpoint
    callbacks = [checkpoint, throughput, energy, StrategyConfigFile(run_dir), RNGStateCallback(),
                 ElasticEpochProgress(), provenance]
    periodic = resolved["checkpoint"]
    if periodic["every_n_train_steps"] or periodic["every_n_minutes"]:
        # last.ckpt during the epoch too; best-* stays with the monitor above
        callbacks.append(periodic_checkpoint(run_dir / CHECKPOINT_DIR, periodic["every_n_train_steps"],
                                             periodic["every_n_minutes"]))
    early_stopping = None
    if resolved["early_stopping"]["patience"]:
        from lightning.pytorch.callbacks import EarlyStopping

        # its state (best score, validations waited) is in the checkpoint, so a resumed run keeps counting
        early_stopping = EarlyStopping(monitor=recipe["monitor"], mode=recipe["monitor_mode"],
                                       patience=resolved["early_stopping"]["patience"],
                                       min_delta=resolved["early_stopping"]["min_delta"])
        callbacks.append(early_stopping)
    logger = tracker.lightning_logger()
    if logger is not None:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    kwargs = trainer_kwargs(resolved["trainer"], resolved["strategy"])
    if kwargs.get("profiler"):
        kwargs["profiler"] = _profiler(kwargs["profiler"], run_dir / PROFILER_DIR)
    callbacks += strategy_callbacks(kwargs)
    kwargs["plugins"] = []
    if resolved["strategy"]["name"] != "deepspeed":  # DeepSpeed writes its checkpoint folders itself
        kwargs["plugins"].append(AtomicCheckpointIO())
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    requeue_signal = None
    if SLURMEnvironment.detect():  # our requeue (between steps) instead of Lightning's (inside the handler)
        import signal

        kwargs["plugins"].append(SLURMEnvironment(auto_requeue=False))
        requeue_signal = signal.SIGUSR1  # the --signal=USR1@<s> of slurm/sbatch.sh.j2
    signal_checkpoint = SignalCheckpoint(requeue_signal)
    budget_kwh, budget = resolved["energy"].get("budget_kwh"), None
    if budget_kwh is not None:  # before SignalCheckpoint: the stop it asks for is taken at the same boundary
        from aifactory_train.energy_budget import EnergyBudget

        budget = EnergyBudget(budget_kwh, energy, signal_checkpoint, run_dir)
        callbacks.append(budget)
    callbacks.append(signal_checkpoint)
    trainer = L.Trainer(
        **kwargs,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        default_root_dir=run_dir,
    )
    batch = batch_plan(resolved, trainer.world_size)  # the rank count is known now (devices: auto)
    trainer.accumulate_grad_batches = batch["accumulate_grad_batches"]  # read by the loop (and DeepSpeed) in fit

    from aifactory_train.energy import check_meter, set_aside_earlier_energy, summarize

    energy.meters, energy_reason = check_meter(resolved["energy"], on_gpu=trainer.strategy.root_device.type == "cuda")
    from aifactory_train.energy_budget import no_counter_reason

    if (unmeasurable := no_counter_reason(budget_kwh, energy.meters, energy_reason)) is not None:
        from aifactory_train.errors import ConfigError

        raise ConfigError(unmeasurable)
    if not ckpt_path and is_global_zero():
        set_aside_earlier_energy(run_dir)  # a fresh start in a used folder does not add the old run's energy
    if ckpt_path:
        from aifactory_train.checkpoints import check_world_size

        if (warning := check_world_size(ckpt_path, trainer.world_size, batch)) and is_global_zero():
            log.warning(warning)

    config_yaml = run_dir / "config.yaml"
    if is_global_zero():
        from aifactory_train.records import redacted

        record = redacted(resolved)  # the config as written down and logged: no passwords (tracking.uri's)
        config_yaml.write_text(OmegaConf.to_yaml(record))
        lineage = datamodule.lineage()
        tracker.log_run_start(record, config_yaml, lineage)
        provenance.begin(training_provenance(record, lineage, tracker, run_dir))
        # tags, not params: a job resumed on another rank count has another accumulation (and, without
        # trainer.global_batch_size, another global batch)
        tracker.set_tags({f"aift.batch.{key}": str(value) for key, value in batch.items()})
        for line in unverified:
            log.warning("checkpoint.trust=true: loading unverified: %s", line)
        if unverified:  # on record in the run: what checkpoint.trust let through
            tracker.set_tags({"aift.checkpoint.trusted_unverified": "; ".join(unverified)[:5000]})
        if usage is not None:  # who used the data, where, for which recipe, under which terms (usage_terms.py)
            tracker.set_tags(usage_tags(usage))
        log.info("global batch %s = %s per device x %d accumulated x %d rank(s)%s", batch["global"],
                 batch["per_device"], batch["accumulate_grad_batches"], batch["ranks"],
                 " (trainer.global_batch_size)" if batch["global_fixed"] else "")
        tracker.start_system_metrics()
    else:
        lineage = None

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        metrics = _scalar_metrics(trainer.callback_metrics)
        best_path, last_path = checkpoint.best_model_path, checkpoint.last_model_path
        tested = None
        if cfg.run_test and datamodule.has_split("test") and resolved["strategy"]["name"] == "fsdp":
            # Lightning's FSDP test stage after fit does not reload a full state dict into the wrapped model (nor
            # run the unwrapped one): score the checkpoint in a separate `aift eval`, which loads it whole
            log.warning("strategy=fsdp: no test stage in this run; score a checkpoint with `aift eval ckpt_path=...`")
        elif cfg.run_test and datamodule.has_split("test"):
            tested = "best" if best_path else "final"
            if best_path and Path(best_path).is_dir():
                # a DeepSpeed folder, which DeepSpeed unpickles without weights_only: the checkpoint's callback
                # state names it, so a crafted resume could point it anywhere. It must be this run's, and pass
                # the same check as the folder resumed from
                from aifactory_train.checkpoints import TRUST_RESUME, verify_deepspeed_checkpoint

                own = (run_dir / CHECKPOINT_DIR).resolve()
                if own not in Path(best_path).resolve().parents:
                    from aifactory_train.errors import CheckpointError

                    raise CheckpointError(f"the best checkpoint recorded in the resumed state, '{best_path}', is not "
                                          f"in this run's '{own}'; resume from a checkpoint of this run")
                late = verify_deepspeed_checkpoint(best_path, resolved["checkpoint"]["trust"], TRUST_RESUME)
                for line in late:
                    log.warning("checkpoint.trust=true: loading unverified: %s", line)
                if late and is_global_zero():
                    tracker.set_tags({"aift.checkpoint.trusted_unverified_best": "; ".join(late)[:5000]})
            if best_path and zero_stage(trainer) == 3:
                # DeepSpeed cannot load a ZeRO-3 checkpoint into its inference engine (Lightning #17704): test the
                # weights in memory, and say so
                log.warning("ZeRO-3: testing the final weights in memory, not the best checkpoint (consolidate it "
                            "with `aift checkpoint consolidate` and score it with `aift eval`)")
                tested = "final"
            trainer.test(module, datamodule=datamodule, ckpt_path="best" if tested == "best" else None,
                         weights_only=True)
            metrics.update(_scalar_metrics(trainer.callback_metrics))
        energy.finish()
        if trainer.world_size > 1:
            trainer.strategy.barrier("energy")  # every rank's energy file is final before rank 0 adds them up
    except JobStopped as stopped:
        energy.finish()  # its file keeps this job's share; the continuing job adds its own
        tracker.stop_system_metrics()  # the run stays open for the continuing job; the sampler does not
        from aifactory_train.resume import EnergyBudgetStop

        if isinstance(stopped, EnergyBudgetStop):
            return _budget_stopped(stopped, budget, resolved, run_dir, trainer, tracker, ckpt_path, energy_reason)
        if isinstance(stopped, JobRequeued):
            log.info("saved %s and requeued the job; the requeued job continues from it", stopped)
            return {"status": "requeued", "checkpoint": str(stopped)}
        log.info("stopped on SIGTERM after saving %s; the same command with ckpt_path=auto continues from it", stopped)
        return {"status": "stopped", "checkpoint": str(stopped)}
    except BaseException:
        energy.finish()
        tracker.finish("FAILED")
        raise

    summary = {
        "schema_version": SUMMARY_SCHEMA_VERSION,
        "status": "completed",
        "recipe": recipe["name"],
        "task": recipe["task"],
        "model": resolved["model"]["name"],
        "output_dir": str(run_dir.resolve()),
        "tracking_uri": tracker.recorded_uri,
        "mlflow_run_id": tracker.run_id,
        "mlflow_experiment": resolved["tracking"]["experiment"] if tracker.enabled else None,
        "metrics": metrics,
        "monitor": recipe["monitor"],
        "best_score": float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else None,
        "best_checkpoint": str(Path(best_path).resolve()) if best_path else None,
        "last_checkpoint": str(Path(last_path).resolve()) if last_path else None,
        "resumed_from": ckpt_path,
        "tested_weights": tested,
        "global_step": trainer.global_step,
        "epochs": trainer.current_epoch,
        "early_stopping": _early_stopping_summary(early_stopping),
        "train_samples": throughput.samples,
        "train_samples_per_s": throughput.samples_per_s,
        "train_tokens": throughput.tokens,
        "train_tokens_per_s": throughput.tokens_per_s,
        "wall_time_s": round(time.time() - started, 3),
        "train_flops_per_sample": getattr(module, "flops_per_sample", None),
        "train_flops_per_token": getattr(module, "flops_per_token", None),
        "precision": str(trainer.precision),
        "num_processes": trainer.world_size,
        "batch": batch,
        "peak_device_memory_gib": _peak_device_memory_gib(trainer),
        "dataset": lineage.as_dict() if lineage is not None else None,
        "usage_check": usage,  # what the owner's terms were checked against (usage_terms.check_usage)
    }
    if not is_global_zero():
        return summary
    summary["energy"] = summarize(run_dir, energy_reason)
    from aifactory_train.energy_budget import energy_per_sample, run_samples

    summary["energy"].update(energy_per_sample(summary["energy"], *run_samples(summary, ckpt_path is not None)))
    if budget_kwh is not None:
        summary["energy_budget"] = {"budget_kwh": budget_kwh, "stopped": False,
                                    "kwh_total": summary["energy"].get("kwh")}
    if summary["energy"]["measured"]:
        energy_metrics = {f"energy/{k}": summary["energy"][k]
                          for k in ("kwh", "joules", "mean_watts", "joules_per_sample", "joules_per_token")
                          if summary["energy"].get(k) is not None}
        if len(summary["energy"]["by_meter"]) > 1:  # a GPU run with its CPU packages: each part too
            energy_metrics.update({f"energy/{name}/kwh": part["kwh"]
                                   for name, part in summary["energy"]["by_meter"].items()})
        tracker.log_metrics(energy_metrics, step=trainer.global_step)
    summary_path = write_summary(run_dir, summary)
    tags = {"aift.checkpoint.best": summary["best_checkpoint"] or "",
            "aift.checkpoint.last": summary["last_checkpoint"] or ""}
    if summary["early_stopping"] is not None:
        tags["aift.early_stopping"] = summary["early_stopping"]["reason"]
    tracker.set_tags(tags)
    artifacts = [run_dir / "reports", run_dir / PROFILER_DIR, summary_path]
    if resolved["tracking"].get("log_checkpoints"):
        artifacts.append(run_dir / CHECKPOINT_DIR)
    tracker.log_artifacts(artifacts)
    tracker.finish("FINISHED")
    print(f"summary: {summary_path}")
    return summary
