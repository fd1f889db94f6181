"""`aift export`: turn a checkpoint into a deployable model (format per recipe: ONNX, HF folder, ...)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


def run_export(cfg) -> dict[str, Any]:
    from aifactory_train.commands.preamble import open_checkpoint_command
    from aifactory_train.errors import ConfigError
    from aifactory_train.recipe import Exports

    command = open_checkpoint_command(cfg, "aift export", Exports, f"has no export; nothing to do for format={cfg.format}")
    formats = command.recipe.module_class.EXPORT_FORMATS
    if cfg.format not in formats:
        raise ConfigError(f"config key 'format': {command.recipe.name} exports "
                          f"{' or '.join(repr(valid) for valid in formats)}, not '{cfg.format}'")
    resolved, run_dir = command.resolved, command.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = command.find_checkpoint()
    from aifactory_train.run.provenance import PROVENANCE_FILE, write_export_provenance

    options = dataclasses.asdict(command.typed.export)  # ExportOptions or the recipe's subclass, checked
    register = options["register"]
    # the checkpoint's record names its store without the password; this config's tracking.uri may hold it
    tracking = resolved.get("tracking") or {}
    live_uri = tracking.get("uri") if tracking.get("backend") == "mlflow" else None
    training_run = registry_target(ckpt_path, live_uri) if register else None  # refused before anything is written
    module = command.load_module()
    files = module.export_model(cfg.format, run_dir, options)
    # which data and run made this model, beside it, in its folder and in an ONNX file's metadata
    document = write_export_provenance(ckpt_path, cfg.format, files, run_dir, live_uri)
    files = [*files, run_dir / PROVENANCE_FILE]
    report = {"checkpoint": str(Path(ckpt_path).resolve()), "recipe": resolved["recipe"]["name"], "format": cfg.format,
              "files": [str(Path(f).resolve()) for f in files]}
    if register:
        report["registered"] = register_export(training_run, str(register), document, files, run_dir)
    (run_dir / "export.json").write_text(json.dumps(report, indent=2) + "\n")
    for file in report["files"]:
        print(f"wrote {file}")
    if register:
        registered = report["registered"]
        print(f"registered {registered['name']} version {registered['version']} in {registered['tracking_uri']}")
    return report


def registry_target(ckpt_path: str, live_uri: str | None = None) -> dict[str, str]:
    """The tracked training run of a checkpoint (from its provenance record), whose store the export is registered
    in: checked before exporting, so ``export.register`` fails before any file is written. The record's URI has no
    password: ``live_uri`` (this command's tracking.uri) is used when it is the same store, else MLflow's
    credential environment variables are."""
    from aifactory_train.errors import ConfigError, TrackingError
    from aifactory_train.run.provenance import read_provenance
    from aifactory_train.records.masking import connectable
    from aifactory_train.records.tracking import check_tracking_uri

    record = read_provenance(ckpt_path) or {}
    run = (record.get("runs") or [{}])[-1]
    uri, run_id = run.get("tracking_uri"), run.get("mlflow_run_id")
    if not uri or not run_id:
        why = "holds no provenance record" if not record else "was trained without tracking (tracking=none)"
        raise ConfigError(f"config key 'export.register': ckpt_path '{ckpt_path}' {why}, so there is no MLflow run "
                          f"to register the model with; export without export.register")
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise ConfigError(f"config key 'export.register': the training run's store {uri} is not on this machine; "
                          f"export where it is, or without export.register")
    try:
        check_tracking_uri(connectable(uri, live_uri))
    except TrackingError as err:
        raise ConfigError(f"config key 'export.register': {err}") from None
    # tracking_uri is written down (export.json) and printed; connect_uri only connects
    return {"tracking_uri": uri, "run_id": run_id, "connect_uri": connectable(uri, live_uri)}


def register_export(training_run: dict[str, str], name: str, document: dict[str, Any], files: list[Path],
                    out_dir: Path) -> dict[str, Any]:
    """Log the exported files to the training run (``exports/<format>-<time>``) and register them as a new version
    of the MLflow registered model ``name``, the version tagged with where its data came from.

    The files are registered as they are (MLflow's registry takes any source), not re-logged through an MLflow
    flavour: the deployable artefact stays exactly the one `aift export` wrote and tested."""
    import time

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from aifactory_train.run.provenance import onnx_metadata

    client = MlflowClient(tracking_uri=training_run.get("connect_uri", training_run["tracking_uri"]))
    run_id = training_run["run_id"]
    artifact_path = f"exports/{document['export']['format']}-{time.strftime('%Y%m%dT%H%M%S')}"
    out_dir = Path(out_dir).resolve()
    # the exported files, and whole any folder they are in (an HF model folder, with its own provenance.json)
    for top in sorted({out_dir / Path(f).resolve().relative_to(out_dir).parts[0] for f in files}):
        if top.is_dir():
            client.log_artifacts(run_id, str(top), f"{artifact_path}/{top.name}")
        else:
            client.log_artifact(run_id, str(top), artifact_path)
    try:
        client.create_registered_model(name, description="registered by aift export; each version's tags say "
                                                          "which data, run and checkpoint made it")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {k: v for k, v in onnx_metadata(document).items() if k != "aift.provenance"}
    tags.update({"aift.checkpoint.sha256": document["export"]["checkpoint"]["sha256"],
                 "aift.recipe": str(document.get("recipe"))})
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    version = client.create_model_version(name, source, run_id=run_id, tags=tags)
    return {"name": name, "version": int(version.version), "source": source,
            "tracking_uri": training_run["tracking_uri"]}
