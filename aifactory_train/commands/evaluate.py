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

    from aifactory_train.commands.preamble import open_checkpoint_command
    from aifactory_train.records.config import build, check_choice, check_data

    command = open_checkpoint_command(cfg, "aift eval")
    check_choice("split", cfg.split, ("test", "val"))
    # the owner's terms: scoring is a use too; before the tracking store is opened and Lightning imported
    usage = check_data(command.typed, stage="eval")
    resolved, run_dir = command.resolved, command.run_dir
    ckpt_path = command.find_checkpoint()  # a missing file, another task's: before anything is tracked
    run_dir.mkdir(parents=True, exist_ok=True)

    import lightning as L

    from aifactory_train.errors import DataError
    from aifactory_train.recipe import adopts_checkpoint, resume_keys
    from aifactory_train.records.tracking import Tracker
    from aifactory_train.run.checkpoints import check_data_matches
    from aifactory_train.run.strategies import resolve_precision

    tracker = Tracker(resolved["tracking"], run_dir, resume=False)  # fails fast on an unreachable store
    datamodule = build(cfg.data, _convert_="all")
    if adopts_checkpoint(datamodule):
        datamodule.adopt_checkpoint(ckpt_path)
    datamodule.setup("test" if cfg.split == "test" else "validate")
    if not datamodule.has_split(cfg.split):
        raise DataError(f"data.root '{resolved['data']['root']}': there is no '{cfg.split}' split to evaluate on")
    check_data_matches(ckpt_path, datamodule.data_info, resume_keys(datamodule))
    module = command.load_module()

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
    from aifactory_train.run.provenance import training_origin

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
        from aifactory_train.records.masking import redacted

        record = redacted(resolved)  # no passwords in the file or the params
        config_yaml.write_text(OmegaConf.to_yaml(record))
        tracker.log_run_start(record, config_yaml, lineage)
        tracker.logger.log_metrics(report["metrics"])
        tracker.set_tags({"aift.run_kind": "eval", "aift.eval.checkpoint": report["checkpoint"], "aift.eval.split": cfg.split,
                          "aift.eval.trained_run_id": trained_run_id or ""})
        if usage is not None:
            from aifactory_train.records.usage_terms import usage_tags

            tracker.set_tags(usage_tags(usage))
        report["mlflow_run_id"] = tracker.run_id
    path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    tracker.log_artifacts([run_dir / "reports", path])
    tracker.finish("FINISHED")
    for key, value in report["metrics"].items():
        print(f"{key}: {value:.4f}")
    print(f"eval: {path}")
    return report
