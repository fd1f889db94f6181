"""`aift export`: turn a checkpoint into a deployable model (format per recipe: ONNX, HF folder, ...)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


def run_export(cfg) -> dict[str, Any]:
    from aifactory_train.commands.preamble import open_checkpoint_command
    from aifactory_train.errors import ConfigError, ReleaseRefused
    from aifactory_train.recipe import ChecksExport, Exports

    command = open_checkpoint_command(cfg, "aift export", Exports, f"has no export; nothing to do for format={cfg.format}")
    formats = command.recipe.module_class.EXPORT_FORMATS
    if cfg.format not in formats:
        raise ConfigError(f"config key 'format': {command.recipe.name} exports "
                          f"{' or '.join(repr(valid) for valid in formats)}, not '{cfg.format}'")
    # an export is always checked against its checkpoint: a recipe that cannot be checked is not exported
    command.recipe.require(ChecksExport, "checked export")
    resolved, run_dir = command.resolved, command.run_dir
    ckpt_path = command.find_checkpoint()
    data_root = checked_data_root(cfg, ckpt_path)  # parity and disclosure read real records: the owner's terms
    if data_root != resolved["data"]["root"]:
        command = open_checkpoint_command(cfg, "aift export", Exports)
        resolved = command.resolved
        command.ckpt_path = ckpt_path
    from aifactory_train.records.config import check_data

    usage = check_data(command.typed, stage="fit")
    run_dir.mkdir(parents=True, exist_ok=True)
    from aifactory_train.run.provenance import PROVENANCE_FILE, write_export_provenance

    options = dataclasses.asdict(command.typed.export)  # ExportOptions or the recipe's subclass, checked
    register = options["register"]
    # the checkpoint's record names its store without the password; this config's tracking.uri may hold it
    tracking = resolved.get("tracking") or {}
    live_uri = tracking.get("uri") if tracking.get("backend") == "mlflow" else None
    training_run = registry_target(ckpt_path, live_uri) if register else None  # refused before anything is written
    module = command.load_module()
    datamodule = export_datamodule(cfg, ckpt_path)
    files = module.export_model(cfg.format, run_dir, options)
    checks = {"parity": check_parity(module, datamodule, files, options)}
    sensitive = sensitivity(resolved["data"]["root"], ckpt_path)
    if sensitive or options["disclosure"]["when"] == "always":
        checks["disclosure"] = check_disclosure(module, datamodule, ckpt_path, options["disclosure"], sensitive)
    released = all(check["passed"] for check in checks.values())
    if not released:  # the exported model must not be used: only the reports stay, nothing is registered
        remove_exported(files, run_dir)
        files = []
    # which data and run made this model, beside it, in its folder and in an ONNX file's metadata
    document = write_export_provenance(ckpt_path, cfg.format, files, run_dir, live_uri,
                                       checks={**checks, "released": released, "usage_check": usage})
    files = [*files, run_dir / PROVENANCE_FILE]
    report = {"checkpoint": str(Path(ckpt_path).resolve()), "recipe": resolved["recipe"]["name"], "format": cfg.format,
              "files": [str(Path(f).resolve()) for f in files], "released": released, **checks}
    if register and released:
        report["registered"] = register_export(training_run, str(register), document, files, run_dir)
    (run_dir / "export.json").write_text(json.dumps(report, indent=2) + "\n")
    if not released:
        raise ReleaseRefused(refusal(checks, run_dir))
    for file in report["files"]:
        print(f"wrote {file}")
    parity = checks["parity"]
    print(f"parity: max abs diff {parity['max_abs_diff']:.3g} <= {parity['tolerance']:g} on {parity['inputs']['records']} "
          f"{parity['inputs']['split']} records")
    if "disclosure" in checks:
        print(f"disclosure check passed: {disclosure_figures(checks['disclosure'])}")
    if register:
        registered = report["registered"]
        print(f"registered {registered['name']} version {registered['version']} in {registered['tracking_uri']}")
    return report


def checked_data_root(cfg, ckpt_path: str) -> str:
    """The data the export is checked on: ``data.root`` when it is there, else the data the checkpoint was trained
    on (its provenance record), set as ``data.root`` of ``cfg``. Neither there: one line naming both."""
    from omegaconf import OmegaConf

    from aifactory_train.errors import DataError
    from aifactory_train.run.provenance import read_provenance

    given = str(cfg.data.root)
    if Path(given).is_dir():
        return given
    datasets = (read_provenance(ckpt_path) or {}).get("datasets") or []
    trained = datasets[-1].get("root") if datasets else None
    if trained and Path(trained).is_dir():
        import logging

        logging.getLogger(__name__).warning("data.root '%s' is not there: the export is checked on the data the "
                                            "checkpoint was trained on, %s", given, trained)
        OmegaConf.update(cfg, "data.root", trained)
        return trained
    raise DataError(f"data.root '{given}' does not exist, and the data ckpt_path '{ckpt_path}' was trained on "
                    f"({trained or 'not recorded'}) is not here; aift export checks the exported model on real "
                    f"records: give the data as data.root=DIR")


def export_datamodule(cfg, ckpt_path: str):
    """The recipe's DataModule, all splits read (train too: the disclosure check scores training records), with the
    checkpoint's own preparation (a tokenizer) adopted."""
    from aifactory_train.recipe import adopts_checkpoint
    from aifactory_train.records.config import build
    from aifactory_train.run.checkpoints import check_data_matches
    from aifactory_train.recipe import resume_keys

    datamodule = build(cfg.data, _convert_="all")
    if adopts_checkpoint(datamodule):
        datamodule.adopt_checkpoint(ckpt_path)
    datamodule.setup("fit")
    check_data_matches(ckpt_path, datamodule.data_info, resume_keys(datamodule))
    return datamodule


def eval_split(datamodule) -> str:
    return next(s for s in ("test", "val", "train") if datamodule.has_split(s))


def check_parity(module, datamodule, files: list[Path], options: dict[str, Any]) -> dict[str, Any]:
    """The exported files' outputs against the module's, on ``export.parity_records`` real records."""
    from aifactory_train.run.release import parity

    split = eval_split(datamodule)
    inputs = module.parity_inputs(datamodule, split, int(options["parity_records"]))
    result = parity(module.reference_outputs(inputs), module.exported_outputs(files, inputs),
                    float(options["parity_tolerance"]))
    first = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs
    records = len(first)
    return {**result, "inputs": {"split": split, "records": records}}


def sensitivity(data_root: str, ckpt_path: str) -> list[str]:
    """Why the data is sensitive (empty: it is not): a data card at or above ``data_root`` with ``sensitivity:
    high`` or ``deidentified: true`` (patient text), or the checkpoint's record of its training data saying so."""
    from aifactory_train.records.usage_terms import datacards_for, load_datacard
    from aifactory_train.run.provenance import read_provenance

    reasons = []
    for card_path in datacards_for(data_root):
        card = load_datacard(card_path)
        if str(card.get("sensitivity", "")).lower() == "high":
            reasons.append(f"{card_path}: sensitivity: high")
        if str(card.get("deidentified", "")).lower() == "true":
            reasons.append(f"{card_path}: deidentified: true (de-identified personal data)")
    for dataset in (read_provenance(ckpt_path) or {}).get("datasets") or []:
        card = dataset.get("datacard") or {}
        if str(card.get("sensitivity", "")).lower() == "high" or str(card.get("deidentified", "")).lower() == "true":
            reasons.append(f"the checkpoint's training data {dataset.get('root')}: marked sensitive in its card")
    return sorted(set(reasons))


def check_disclosure(module, datamodule, ckpt_path: str, options: dict[str, Any], sensitive: list[str]):
    from aifactory_train.run.provenance import read_provenance
    from aifactory_train.run.release import disclosure_report

    report = {"why_checked": sensitive or ["export.disclosure.when=always"],
              **disclosure_report(module, datamodule, options,
                                 held_out=[s for s in ("val", "test") if datamodule.has_split(s)])}
    # the membership test is only meaningful on the records the model was trained on
    trained = {d.get("splits", {}).get("train", {}).get("digest")
               for d in (read_provenance(ckpt_path) or {}).get("datasets") or []}
    here = datamodule.lineage().splits.get("train")
    report["train_split_is_the_checkpoints"] = here is not None and here.digest in trained
    if not report["train_split_is_the_checkpoints"]:
        report["passed"] = False
        report["why"] = ("the train split at data.root is not the data the checkpoint was trained on (digest); give "
                         "that data as data.root")
    return report


def disclosure_figures(report: dict[str, Any]) -> str:
    tests = report.get("tests", {})
    parts = []
    if "membership_inference" in tests:
        parts.append(f"membership AUC {tests['membership_inference']['auc']}")
    if "verbatim_memorisation" in tests:
        test = tests["verbatim_memorisation"]
        parts.append(f"verbatim train {test['verbatim_fraction_train']} / held-out "
                     f"{test['verbatim_fraction_held_out']}")
    if "vocabulary" in tests:
        parts.append(f"{tests['vocabulary']['rare_entries']} rare vocabulary entries")
    return ", ".join(parts)


def refusal(checks: dict[str, Any], run_dir: Path) -> str:
    from aifactory_train.run.release import failed_tests

    where = f"not released, no model file kept, nothing registered; the reports are in {run_dir / 'export.json'}"
    parity = checks["parity"]
    if not parity["passed"]:
        bad = {k: v for k, v in parity["outputs"].items() if not v["max_abs_diff"] <= parity["tolerance"]}
        return (f"export check: the exported model's outputs differ from the checkpoint's on "
                f"{parity['inputs']['records']} {parity['inputs']['split']} records: max abs diff "
                f"{parity['max_abs_diff']:.3g} > export.parity_tolerance {parity['tolerance']:g} "
                f"({', '.join(bad) or 'no outputs'}); {where}")
    disclosure = checks["disclosure"]
    why = disclosure.get("why") if not disclosure.get("train_split_is_the_checkpoints", True) else None
    return (f"disclosure check failed for sensitive data ({disclosure['why_checked'][0]}): "
            f"{why or failed_tests(disclosure)}; {where}")


def remove_exported(files: list[Path], run_dir: Path) -> None:
    """Delete the exported files (and the folders they are in, inside ``run_dir``) of a refused export."""
    import shutil

    out = Path(run_dir).resolve()
    for file in files:
        path = Path(file).resolve()
        if not path.is_relative_to(out):
            continue
        top = out / path.relative_to(out).parts[0]
        if top.is_dir():
            shutil.rmtree(top, ignore_errors=True)
        elif top.exists():
            top.unlink()


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
