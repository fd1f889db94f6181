"""`aift eval`: score a checkpoint on a split of the configured data; writes eval.json."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

EVAL_FILE = "eval.json"


def run_evaluation(cfg) -> dict[str, Any]:
    started = time.time()
    from omegaconf import OmegaConf

    from aifactory_train.config import build, check_choice, check_data, require_checkpoint, validate

    typed = validate(cfg)
    require_checkpoint(cfg, "aift eval")
    check_choice("split", cfg.split, ("test", "val"))
    usage = check_data(typed, stage="eval")  # the owner's terms: scoring is a use too; before the tracking store is opened and Lightning imported
    run_dir = Path(cfg.paths.output_dir)
    from aifactory_train.checkpoints import resolve_checkpoint

    ckpt_path = resolve_checkpoint(cfg.ckpt_path, run_dir)  # a missing file: before anything is tracked
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)

    import lightning as L
    from hydra.utils import get_class

    from aifactory_train.checkpoints import check_checkpoint_task, check_data_matches, load_trained_module
    from aifactory_train.errors import DataError
    from aifactory_train.strategies import resolve_precision

    from aifactory_train.train import use_hydra_logging

    use_hydra_logging()
    from aifactory_train.tracking import Tracker

    check_checkpoint_task(ckpt_path, resolved["recipe"])  # before the tracking store is opened
    tracker = Tracker(resolved["tracking"], run_dir, resume=False)  # fails fast on an unreachable store
    datamodule = build(cfg.data, _convert_="all")
    if hasattr(datamodule, "adopt_checkpoint"):
        datamodule.adopt_checkpoint(ckpt_path)
    datamodule.setup("test" if cfg.split == "test" else "validate")
    if not datamodule.has_split(cfg.split):
        raise DataError(f"data.root '{resolved['data']['root']}': there is no '{cfg.split}' split to evaluate on")
    check_data_matches(ckpt_path, datamodule.data_info)
    module_class = get_class(resolved["recipe"]["module"]["_target_"])
    module = load_trained_module(module_class, ckpt_path)

    accelerator = resolved["trainer"]["accelerator"]
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=resolve_precision(resolved["trainer"]["precision"], accelerator),
        logger=False,
        default_root_dir=run_dir,
        enable_progress_bar=resolved["trainer"]["enable_progress_bar"],
        limit_test_batches=resolved["trainer"]["limit_test_batches"],
        limit_val_batches=resolved["trainer"]["limit_val_batches"],
    )
    run = trainer.test if cfg.split == "test" else trainer.validate
    results = run(module, datamodule=datamodule)
    metrics = {k: float(v) for k, v in (results[0] if results else {}).items()}
    lineage = datamodule.lineage()
    from aifactory_train.provenance import training_origin

    trained_run_id, trained_on = training_origin(ckpt_path)
    report = {
        "checkpoint": str(Path(ckpt_path).resolve()),
        "recipe": resolved["recipe"]["name"],
        "split": cfg.split,
        "metrics": dict(sorted(metrics.items())),
        "dataset": lineage.as_dict(),
        "output_dir": str(run_dir.resolve()),
        "wall_time_s": round(time.time() - started, 3),
        "trained_mlflow_run_id": trained_run_id,
        # the data the model was trained on (digests, owner, consent), next to the data it is scored on
        "trained_on": trained_on,
        "tracking_uri": tracker.recorded_uri,
        "mlflow_run_id": None,
        "usage_check": usage,  # what the owner's terms were checked against (usage_terms.check_usage)
    }
    path = run_dir / EVAL_FILE
    if tracker.enabled:
        # one MLflow run per evaluation, next to the training runs, linked to the one that made the checkpoint
        tracker.lightning_logger()
        config_yaml = run_dir / "config.yaml"
        from aifactory_train.records import redacted

        record = redacted(resolved)  # no passwords in the file or the params
        config_yaml.write_text(OmegaConf.to_yaml(record))
        tracker.log_run_start(record, config_yaml, lineage)
        tracker.logger.log_metrics(report["metrics"])
        tracker.set_tags({"aift.run_kind": "eval", "aift.eval.checkpoint": report["checkpoint"], "aift.eval.split": cfg.split,
                          "aift.eval.trained_run_id": trained_run_id or ""})
        if usage is not None:
            from aifactory_train.usage_terms import usage_tags

            tracker.set_tags(usage_tags(usage))
        report["mlflow_run_id"] = tracker.run_id
    path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    tracker.log_artifacts([run_dir / "reports", path])
    tracker.finish("FINISHED")
    for key, value in report["metrics"].items():
        print(f"{key}: {value:.4f}")
    print(f"eval: {path}")
    return report
