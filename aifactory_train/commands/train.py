"""`aift train`: the training entry every recipe shares, as named steps: preflight, open the run, build the
data and the module, build the trainer, record the start, fit and test, write the summary.

Everything use-case specific is built from config with ``hydra.utils.instantiate``: the DataModule from
``data._target_`` and the LightningModule from ``recipe.module._target_``. What they must provide is the recipe
contract in ``aifactory_train/recipe.py``; the Trainer is assembled in ``aifactory_train/run/trainer.py``.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aifactory_train.run.trainer import (PROFILER_DIR, build_trainer, early_stopping_summary, peak_device_memory_gib,
                                        zero_stage)

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


def use_hydra_logging() -> None:
    """Lightning adds its own console handler; under Hydra the root logger already prints and writes the
    run's log file, so drop Lightning's to avoid every line appearing twice."""
    root = logging.getLogger()
    if root.handlers:
        lightning_logger = logging.getLogger("lightning")
        for handler in list(lightning_logger.handlers):
            lightning_logger.removeHandler(handler)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    """Write summary.json atomically (a reader never sees half a file)."""
    path = run_dir / SUMMARY_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path




@dataclass
class OpenRun:
    """A training run once its folder, tracker and checkpoint are settled."""

    cfg: Any
    resolved: dict[str, Any]
    run_dir: Path
    ckpt_path: str | None  # None: a fresh start
    unverified: list[str]  # what checkpoint.trust let through (a DeepSpeed folder not verified)
    tracker: Any
    usage: dict[str, Any] | None  # what the owner's terms were checked against (usage_terms.check_usage)


def run_training(cfg) -> dict[str, Any]:
    """Train the configured recipe; return the summary (also written to <run dir>/summary.json)."""
    started = time.time()
    usage = preflight(cfg)
    run = open_run(cfg, usage)
    datamodule, module = build_data_and_module(run)
    parts = build_trainer(run.resolved, run.run_dir, run.tracker.lightning_logger())
    lineage = record_run_start(run, datamodule, parts)
    outcome = fit_and_test(run, datamodule, module, parts)
    if outcome["status"] != "completed":
        return outcome
    return write_run_summary(run, module, parts, lineage, outcome, started)


def preflight(cfg) -> dict[str, Any] | None:
    """Types and names, the data files and the owner's terms: before any data is read or tracking run created,
    and in about a second."""
    from omegaconf import OmegaConf

    from aifactory_train.recipe import load_recipe
    from aifactory_train.records.config import check_data, validate

    typed = validate(cfg)
    usage = check_data(typed)
    load_recipe(OmegaConf.to_container(cfg, resolve=True))  # the recipe's classes against the contract
    return usage


def open_run(cfg, usage) -> OpenRun:
    """The run folder, the checkpoint to resume from (``ckpt_path=auto``: None on a first start; a DeepSpeed
    folder verified before DeepSpeed unpickles it), and the tracker (fails fast on an unreachable store)."""
    from omegaconf import OmegaConf

    from aifactory_train.records.tracking import Tracker
    from aifactory_train.run.checkpoints import TRUST_RESUME, resolve_checkpoint, verify_deepspeed_checkpoint

    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    ckpt_path = resolve_checkpoint(cfg.ckpt_path, run_dir)
    unverified = []
    if ckpt_path and Path(ckpt_path).is_dir():  # DeepSpeed unpickles its shards with weights_only=False
        unverified = verify_deepspeed_checkpoint(ckpt_path, resolved["checkpoint"]["trust"], TRUST_RESUME)
    tracker = Tracker(resolved["tracking"], run_dir, resume=ckpt_path is not None)
    return OpenRun(cfg, resolved, run_dir, ckpt_path, unverified, tracker, usage)


def build_data_and_module(run: OpenRun):
    """The recipe's DataModule (set up for fit; on resume after adopting what the checkpoint prepared, and checked
    against what it was trained on) and its LightningModule."""
    import lightning as L

    from aifactory_train.records.config import build
    from aifactory_train.recipe import adopts_checkpoint, resume_keys
    from aifactory_train.run.checkpoints import check_data_matches

    use_hydra_logging()
    L.seed_everything(run.cfg.seed, workers=True)
    datamodule = build(run.cfg.data, _convert_="all")
    if run.ckpt_path and adopts_checkpoint(datamodule):
        datamodule.adopt_checkpoint(run.ckpt_path)  # e.g. the tokenizer the checkpoint was trained with
    datamodule.setup("fit")
    if run.ckpt_path:
        check_data_matches(run.ckpt_path, datamodule.data_info, resume_keys(datamodule))
        log.info("resuming from %s", run.ckpt_path)
    module = build(run.cfg.recipe.module, model=run.resolved["model"], optim=run.resolved["optim"],
                   loss=run.resolved["loss"], data_info=datamodule.data_info, _convert_="all")
    return datamodule, module


def record_run_start(run: OpenRun, datamodule, parts):
    """config.yaml (passwords masked), the tracked run's params, tags and lineage, the provenance every
    checkpoint carries; on rank 0. Returns the dataset lineage (None on other ranks)."""
    from omegaconf import OmegaConf

    from aifactory_train.records.energy import set_aside_earlier_energy
    from aifactory_train.records.masking import redacted
    from aifactory_train.records.tracking import is_global_zero
    from aifactory_train.records.usage_terms import usage_tags
    from aifactory_train.run.checkpoints import check_world_size
    from aifactory_train.records.consent import provenance_entry
    from aifactory_train.run.provenance import training_provenance

    if not run.ckpt_path and is_global_zero():
        set_aside_earlier_energy(run.run_dir)  # a fresh start in a used folder does not add the old run's energy
    batch = parts.batch
    if run.ckpt_path and (warning := check_world_size(run.ckpt_path, parts.trainer.world_size, batch)) \
            and is_global_zero():
        log.warning(warning)
    if not is_global_zero():
        return None
    record = redacted(run.resolved)  # the config as written down and logged: no passwords (tracking.uri's)
    config_yaml = run.run_dir / "config.yaml"
    config_yaml.write_text(OmegaConf.to_yaml(record))
    lineage = datamodule.lineage()
    run.tracker.log_run_start(record, config_yaml, lineage)
    # the declared purpose and the cards' DUO codes travel with every checkpoint and export
    parts.provenance.begin({**training_provenance(record, lineage, run.tracker, run.run_dir),
                            **provenance_entry(run.usage)})
    # tags, not params: a job resumed on another rank count has another accumulation (and, without
    # trainer.global_batch_size, another global batch)
    run.tracker.set_tags({f"aift.batch.{key}": str(value) for key, value in batch.items()})
    for line in run.unverified:
        log.warning("checkpoint.trust=true: loading unverified: %s", line)
    if run.unverified:  # on record in the run: what checkpoint.trust let through
        run.tracker.set_tags({"aift.checkpoint.trusted_unverified": "; ".join(run.unverified)[:5000]})
    if run.usage is not None:  # who used the data, where, for which recipe, under which terms
        run.tracker.set_tags(usage_tags(run.usage))
    log.info("global batch %s = %s per device x %d accumulated x %d rank(s)%s", batch["global"],
             batch["per_device"], batch["accumulate_grad_batches"], batch["ranks"],
             " (trainer.global_batch_size)" if batch["global_fixed"] else "")
    run.tracker.start_system_metrics()
    return lineage


def fit_and_test(run: OpenRun, datamodule, module, parts) -> dict[str, Any]:
    """Fit, then test the best checkpoint (or the final weights where it cannot be loaded). A stop or requeue
    signal ends here with the checkpoint it saved; the MLflow run then stays open for the continuing job."""
    from aifactory_train.run.preemption import EnergyBudgetStop, JobRequeued, JobStopped

    trainer, energy, cfg = parts.trainer, parts.energy, run.cfg
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=run.ckpt_path, weights_only=True)
        metrics = _scalar_metrics(trainer.callback_metrics)
        # read now: the test stage below restores the callback's state from the best checkpoint
        best_path, last_path = parts.checkpoint.best_model_path, parts.checkpoint.last_model_path
        tested = None
        if cfg.run_test and datamodule.has_split("test") and run.resolved["strategy"]["name"] == "fsdp":
            # Lightning's FSDP test stage after fit does not reload a full state dict into the wrapped model (nor
            # run the unwrapped one): score the checkpoint in a separate `aift eval`, which loads it whole
            log.warning("strategy=fsdp: no test stage in this run; score a checkpoint with `aift eval ckpt_path=...`")
        elif cfg.run_test and datamodule.has_split("test"):
            tested = "best" if best_path else "final"
            if best_path and Path(best_path).is_dir():
                check_best_deepspeed_folder(run, best_path)
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
        run.tracker.stop_system_metrics()  # the run stays open for the continuing job; the sampler does not
        if isinstance(stopped, EnergyBudgetStop):
            return write_budget_stop(run, parts, stopped)
        if isinstance(stopped, JobRequeued):
            log.info("saved %s and requeued the job; the requeued job continues from it", stopped)
            return {"status": "requeued", "checkpoint": str(stopped)}
        log.info("stopped on SIGTERM after saving %s; the same command with ckpt_path=auto continues from it", stopped)
        return {"status": "stopped", "checkpoint": str(stopped)}
    except BaseException:
        energy.finish()
        run.tracker.finish("FAILED")
        raise
    return {"status": "completed", "metrics": metrics, "tested": tested, "best_path": best_path,
            "last_path": last_path}


def write_budget_stop(run: OpenRun, parts, stopped) -> dict[str, Any]:
    """energy.budget_kwh stopped the run at a step boundary, after saving ``stopped``'s checkpoint: summary.json says
    so (status ``stopped_energy_budget``), the energy goes to MLflow, and the MLflow run stays open for the job that
    resumes it (``ckpt_path=auto``)."""
    from aifactory_train.records.energy import summarize
    from aifactory_train.records.tracking import is_global_zero
    from aifactory_train.run.energy_budget import budget_summary, energy_per_sample, run_samples

    resolved, trainer, tracker = run.resolved, parts.trainer, run.tracker
    budget_kwh = resolved["energy"]["budget_kwh"]
    log.info("stopped by energy.budget_kwh=%s after saving %s; ckpt_path=auto with a larger budget continues",
             budget_kwh, stopped)
    outcome = {"status": "stopped_energy_budget", "checkpoint": str(stopped)}
    if not is_global_zero():
        return outcome
    energy = summarize(run.run_dir, parts.energy.reason)
    samples, _, how = run_samples({"global_step": trainer.global_step, "batch": parts.batch, "train_samples": None},
                                  True)
    energy.update(energy_per_sample(energy, samples, None, how))
    summary = {
        "schema_version": SUMMARY_SCHEMA_VERSION, "status": "stopped_energy_budget",
        "recipe": resolved["recipe"]["name"], "task": resolved["recipe"]["task"], "model": resolved["model"]["name"],
        "output_dir": str(run.run_dir.resolve()), "tracking_uri": tracker.recorded_uri, "mlflow_run_id": tracker.run_id,
        "resumed_from": run.ckpt_path, "global_step": trainer.global_step, "epochs": trainer.current_epoch,
        "batch": parts.batch, "checkpoint": str(stopped), "energy": energy,
        "energy_budget": budget_summary(budget_kwh, parts.budget, energy, str(stopped), trainer.global_step),
    }
    if energy["measured"]:
        tracker.log_metrics({f"energy/{k}": energy[k] for k in ("kwh", "joules", "joules_per_sample")
                             if energy.get(k) is not None}, step=trainer.global_step)
    tracker.set_tags({"aift.stopped": "energy_budget"})
    path = write_summary(run.run_dir, summary)
    print(f"stopped: energy.budget_kwh={budget_kwh} reached at step {trainer.global_step}; checkpoint {stopped}; "
          f"summary: {path}")
    return outcome


def check_best_deepspeed_folder(run: OpenRun, best_path: str) -> None:
    """The best checkpoint as a DeepSpeed folder, which DeepSpeed unpickles without weights_only: the checkpoint's
    callback state names it, so a crafted resume could point it anywhere. It must be this run's, and pass the same
    check as the folder resumed from."""
    from aifactory_train.errors import CheckpointError
    from aifactory_train.records.tracking import is_global_zero
    from aifactory_train.run.checkpoints import CHECKPOINT_DIR, TRUST_RESUME, verify_deepspeed_checkpoint

    own = (run.run_dir / CHECKPOINT_DIR).resolve()
    if own not in Path(best_path).resolve().parents:
        raise CheckpointError(f"the best checkpoint recorded in the resumed state, '{best_path}', is not "
                              f"in this run's '{own}'; resume from a checkpoint of this run")
    late = verify_deepspeed_checkpoint(best_path, run.resolved["checkpoint"]["trust"], TRUST_RESUME)
    for line in late:
        log.warning("checkpoint.trust=true: loading unverified: %s", line)
    if late and is_global_zero():
        run.tracker.set_tags({"aift.checkpoint.trusted_unverified_best": "; ".join(late)[:5000]})


def write_run_summary(run: OpenRun, module, parts, lineage, outcome: dict[str, Any], started: float) -> dict[str, Any]:
    """summary.json, the energy figures, the last tags and artefacts in MLflow; the tracked run is closed."""
    from aifactory_train.records.energy import summarize
    from aifactory_train.records.tracking import is_global_zero
    from aifactory_train.recipe import counted_flops
    from aifactory_train.run.checkpoints import CHECKPOINT_DIR
    from aifactory_train.run.energy_budget import energy_per_sample, run_samples

    trainer, checkpoint, throughput = parts.trainer, parts.checkpoint, parts.throughput
    resolved, recipe, tracker = run.resolved, run.resolved["recipe"], run.tracker
    best_path, last_path = outcome["best_path"], outcome["last_path"]
    flops_per_sample, flops_per_token = counted_flops(module)
    summary = {
        "schema_version": SUMMARY_SCHEMA_VERSION,
        "status": "completed",
        "recipe": recipe["name"],
        "task": recipe["task"],
        "model": resolved["model"]["name"],
        "output_dir": str(run.run_dir.resolve()),
        "tracking_uri": tracker.recorded_uri,
        "mlflow_run_id": tracker.run_id,
        "mlflow_experiment": resolved["tracking"]["experiment"] if tracker.enabled else None,
        "metrics": outcome["metrics"],
        "monitor": recipe["monitor"],
        "best_score": float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else None,
        "best_checkpoint": str(Path(best_path).resolve()) if best_path else None,
        "last_checkpoint": str(Path(last_path).resolve()) if last_path else None,
        "resumed_from": run.ckpt_path,
        "tested_weights": outcome["tested"],
        "global_step": trainer.global_step,
        "epochs": trainer.current_epoch,
        "early_stopping": early_stopping_summary(parts.early_stopping),
        "train_samples": throughput.samples,
        "train_samples_per_s": throughput.samples_per_s,
        "train_tokens": throughput.tokens,
        "train_tokens_per_s": throughput.tokens_per_s,
        "wall_time_s": round(time.time() - started, 3),
        "train_flops_per_sample": flops_per_sample,
        "train_flops_per_token": flops_per_token,
        "precision": str(trainer.precision),
        "num_processes": trainer.world_size,
        "batch": parts.batch,
        "peak_device_memory_gib": peak_device_memory_gib(trainer),
        "dataset": lineage.as_dict() if lineage is not None else None,
        "usage_check": run.usage,
    }
    if not is_global_zero():
        return summary
    summary["energy"] = summarize(run.run_dir, parts.energy.reason)
    summary["energy"].update(energy_per_sample(summary["energy"], *run_samples(summary, run.ckpt_path is not None)))
    if resolved["energy"].get("budget_kwh") is not None:
        summary["energy_budget"] = {"budget_kwh": resolved["energy"]["budget_kwh"], "stopped": False,
                                    "kwh_total": summary["energy"].get("kwh")}
    if summary["energy"]["measured"]:
        energy_metrics = {f"energy/{k}": summary["energy"][k]
                          for k in ("kwh", "joules", "mean_watts", "joules_per_sample", "joules_per_token")
                          if summary["energy"].get(k) is not None}
        if len(summary["energy"]["by_meter"]) > 1:  # a GPU run with its CPU packages: each part too
            energy_metrics.update({f"energy/{name}/kwh": part["kwh"]
                                   for name, part in summary["energy"]["by_meter"].items()})
        tracker.log_metrics(energy_metrics, step=trainer.global_step)
    summary_path = write_summary(run.run_dir, summary)
    tags = {"aift.checkpoint.best": summary["best_checkpoint"] or "",
            "aift.checkpoint.last": summary["last_checkpoint"] or ""}
    if summary["early_stopping"] is not None:
        tags["aift.early_stopping"] = summary["early_stopping"]["reason"]
    tracker.set_tags(tags)
    artifacts = [run.run_dir / "reports", run.run_dir / PROFILER_DIR, summary_path]
    if resolved["tracking"].get("log_checkpoints"):
        artifacts.append(run.run_dir / CHECKPOINT_DIR)
    tracker.log_artifacts(artifacts)
    tracker.finish("FINISHED")
    print(f"summary: {summary_path}")
    return summary
