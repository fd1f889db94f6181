"""A model's provenance, kept with the model: which data trained it (digest, owner, licence, consent), which
weights it started from, in which run and with which software.

The run folder and the MLflow store say all of this, but a model leaves them: a checkpoint is copied to another
project, an ONNX file goes onto a sprayer, an HF folder into a hospital's system. So the record travels with it:
* every checkpoint holds it (``ProvenanceRecord``'s state, key ``aift_provenance``);
* `aift export` writes it as ``provenance.json`` beside the exported files and inside an exported folder, and
  into an ONNX file's own metadata (``metadata_props``; onnxruntime reads it as ``custom_metadata_map``).

A run resumed on other data (the class set must match, the files need not) keeps the earlier datasets in its
record: ``datasets`` lists every dataset the weights were trained on, first to last. Model cards (Hugging Face)
and MLflow's dataset inputs say the same for one run; this is the part that must survive the copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATE_KEY = "aift_provenance"
PROVENANCE_FILE = "provenance.json"
SCHEMA_VERSION = 1
# model keys naming the weights a run starts from (a file, or an HF folder)
STARTING_WEIGHTS_KEYS = ("weights_path", "backbone_weights_path", "pretrained_path")


def path_sha256(path: str | Path, cached: bool = True) -> str:
    """SHA-256 of a file, or of a folder: over (relative path, SHA-256) of every file in it. ``cached`` reuses
    the data digest's per-file cache, so a large pretrained model is read once, not at every run."""
    from aifactory_train.records.lineage import DigestCache

    path = Path(path).resolve()
    root = path.parent if path.is_file() else path
    files = {path.name: path} if path.is_file() else \
        {p.relative_to(path).as_posix(): p for p in sorted(path.rglob("*")) if p.is_file()}
    digests = (DigestCache.for_root(root) if cached else DigestCache(None)).file_digests(files)
    if path.is_file():
        return digests[path.name]
    sha = hashlib.sha256()
    for rel in sorted(digests):
        sha.update(f"{rel}\0{digests[rel]}\n".encode())
    return sha.hexdigest()


def software_versions() -> dict[str, str]:
    import lightning
    import torch

    import aifactory_train

    # plain strings: torch's version is a str subclass, which a weights_only load refuses
    return {"aifactory_train": str(aifactory_train.__version__), "torch": str(torch.__version__),
            "lightning": str(lightning.__version__), "python": platform.python_version()}


def training_provenance(resolved: dict[str, Any], lineage, tracker, run_dir: Path) -> dict[str, Any]:
    """This run's record: built by global rank 0 before fit, once the data lineage and the MLflow run exist."""
    model = resolved["model"]
    weights = {key: {"path": str(Path(model[key]).resolve()), "sha256": path_sha256(model[key])}
               for key in STARTING_WEIGHTS_KEYS if model.get(key)}
    from aifactory_train.records.masking import redact_uri

    # the record travels with every checkpoint and export: the store's URI without its password
    uri = redact_uri(_absolute(tracker.uri)) if tracker.enabled else None
    run = {"output_dir": str(Path(run_dir).resolve()), "tracking_uri": uri,
           "mlflow_run_id": tracker.run_id, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return {"schema_version": SCHEMA_VERSION, "recipe": resolved["recipe"]["name"], "model": model["name"],
            "datasets": [lineage.as_dict()], "starting_weights": weights, "runs": [run],
            "software": software_versions()}


def _absolute(uri: str | None) -> str | None:
    """A sqlite store's URI with an absolute path (MLflow's default ``sqlite:///mlflow.db`` is relative to the folder
    the run started in, which the record must not depend on)."""
    if uri and uri.startswith("sqlite:///") and not uri[len("sqlite:///"):].startswith("/"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def merged(earlier: dict[str, Any] | None, current: dict[str, Any]) -> dict[str, Any]:
    """``current`` with what an earlier record of the same weights had that it lacks: datasets (by digest) and
    runs (by output folder and MLflow run) the weights were trained in before this resume."""
    if not earlier:
        return current
    datasets = [d for d in earlier.get("datasets", []) if d.get("digest") not in
                {c["digest"] for c in current["datasets"]}] + current["datasets"]
    known = {(r["output_dir"], r["mlflow_run_id"]) for r in current["runs"]}
    runs = [r for r in earlier.get("runs", []) if (r.get("output_dir"), r.get("mlflow_run_id")) not in known]
    return {**current, "datasets": datasets, "runs": runs + current["runs"],
            "starting_weights": earlier.get("starting_weights") or current["starting_weights"]}


def provenance_callback():
    """The callback that puts the record into every checkpoint (a function, so importing this module does not
    import Lightning)."""
    import lightning as L

    class ProvenanceRecord(L.Callback):
        def __init__(self) -> None:
            self.record: dict[str, Any] | None = None
            self.loaded: dict[str, Any] | None = None

        @property
        def state_key(self) -> str:
            return STATE_KEY

        def begin(self, record: dict[str, Any]) -> None:
            self.record = record

        def state_dict(self) -> dict[str, Any]:
            if self.record is None:  # ranks other than 0 (they do not write the checkpoint)
                return {}
            return merged(self.loaded, self.record)

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            from aifactory_train.records.masking import redacted

            # the resumed weights' history, kept in the next checkpoints (a record written before passwords were
            # masked is masked now)
            self.loaded = redacted(state_dict) or None

    return ProvenanceRecord()


def read_provenance(ckpt_path: str) -> dict[str, Any] | None:
    """A checkpoint's record, or None for a checkpoint written before records were kept (or by another tool)."""
    from aifactory_train.run.checkpoints import load_checkpoint_state

    record = load_checkpoint_state(ckpt_path).get("callbacks", {}).get(STATE_KEY)
    return record or None


def training_origin(ckpt_path: str) -> tuple[str | None, list[dict[str, Any]] | None]:
    """(the MLflow run that wrote the checkpoint, the datasets it was trained on): from the checkpoint's own record,
    else the run id from the ``tracking.json`` of the run folder around it (and no datasets)."""
    from aifactory_train.records.tracking import TRACKING_STATE_FILE

    record = read_provenance(ckpt_path)
    if record and record.get("runs"):
        return record["runs"][-1].get("mlflow_run_id"), record.get("datasets")
    trained = Path(ckpt_path).resolve().parent.parent / TRACKING_STATE_FILE
    run_id = json.loads(trained.read_text()).get("run_id") if trained.is_file() else None
    return run_id, record.get("datasets") if record else None


def write_export_provenance(ckpt_path: str, fmt: str, files: list[Path], out_dir: Path,
                            live_uri: str | None = None, checks: dict[str, Any] | None = None) -> dict[str, Any]:
    """``provenance.json`` for an export: the checkpoint's record plus which checkpoint and files. Written beside
    the exported files (``out_dir / PROVENANCE_FILE``), copied into each exported folder and embedded in each ONNX
    file. Returns the document. ``checks``: what `aift export` checked before release (parity, disclosure).
    ``live_uri``: this command's tracking.uri, to reach the training run's store when
    it is the same one (the record's URI has no password)."""
    from aifactory_train.records.masking import redacted

    # a checkpoint written before passwords were masked still holds one: it must not reach the exported model
    record = redacted(read_provenance(ckpt_path))
    if record is None:
        log.warning("%s holds no provenance record (written before aift kept one, or by another tool): the export's "
                    "%s says so; which data trained this model is only in its training run, if that still exists",
                    ckpt_path, PROVENANCE_FILE)
    checkpoint = {"path": str(Path(ckpt_path).resolve()), "sha256": path_sha256(ckpt_path, cached=False)}
    export = {"checkpoint": checkpoint,
              "format": fmt, "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "files": [_relative(f, out_dir) for f in files], "software": software_versions(),
              **({"checks": checks} if checks is not None else {})}
    document = {"recorded": record is not None, **(record or {}), "export": export}
    text = json.dumps(document, indent=2) + "\n"
    path = Path(out_dir) / PROVENANCE_FILE
    path.write_text(text)
    # the exported folders (an HF model folder): the top-level entries under out_dir that hold exported files
    out = Path(out_dir).resolve()
    inside = [Path(f).resolve().relative_to(out) for f in files if Path(f).resolve().is_relative_to(out)]
    for folder in sorted({out / rel.parts[0] for rel in inside if len(rel.parts) > 1}):
        (folder / PROVENANCE_FILE).write_text(text)
    for file in map(Path, files):
        if file.suffix == ".onnx":
            embed_in_onnx(file, document)
    if record is not None and (checks or {}).get("released", True):  # a refused export went nowhere
        log.info("export: %s", record_export_in_training_run(document, out_dir, live_uri))
    return document


EXPORT_TAG_PREFIX = "aift.export."


def record_export_in_training_run(document: dict[str, Any], out_dir: Path, live_uri: str | None = None) -> str:
    """Tag the training run the record names with this export (``aift.export.<folder hash>`` = ``<format>
    <folder> <time>``), so `aift data runs` tells a data owner where the models trained on their data went.
    Returns what was done, for the log; a store that is not here or not reachable is said, not an error (exports
    are often made elsewhere)."""
    from aifactory_train.records.masking import connectable, redact_text
    from aifactory_train.records.tracking import check_tracking_uri

    run = (document.get("runs") or [{}])[-1]
    uri, run_id = run.get("tracking_uri"), run.get("mlflow_run_id")
    if not uri or not run_id:
        return "the training run was not tracked; the export is not recorded in MLflow"
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return f"the training run's store {uri} is not on this machine; the export is not recorded in MLflow"
    try:
        live = connectable(uri, live_uri)  # the record's URI has no password
        check_tracking_uri(live)
        from mlflow.tracking import MlflowClient

        folder = Path(out_dir).resolve()
        key = EXPORT_TAG_PREFIX + hashlib.sha256(str(folder).encode()).hexdigest()[:12]  # one per export folder
        export = document["export"]
        MlflowClient(tracking_uri=live).set_tag(run_id, key, f"{export['format']} {folder} {export['exported']}")
    except Exception as err:  # noqa: BLE001 - the export itself is done; say why it is not recorded
        return (f"the export could not be recorded in the training run {run_id} "
                f"({type(err).__name__}: {redact_text(str(err))})")
    return f"recorded in the training run {run_id} ({uri}) as tag {key}"


def _relative(path: str | Path, out_dir: Path) -> str:
    path, out_dir = Path(path).resolve(), Path(out_dir).resolve()
    return path.relative_to(out_dir).as_posix() if path.is_relative_to(out_dir) else str(path)


def onnx_metadata(document: dict[str, Any]) -> dict[str, str]:
    """The ONNX metadata entries: the whole record, and the fields a deployment checks most, flat."""
    entries = {"aift.provenance": json.dumps(document, sort_keys=True)}
    if document.get("datasets"):
        data = document["datasets"][-1]
        entries["aift.data.digest"] = data["digest"]
        entries.update({f"aift.data.{k}": str(v) for k, v in data.get("datacard", {}).items()
                        if k in ("owner", "license", "consent")})
    if document.get("runs"):
        entries["aift.mlflow_run_id"] = str(document["runs"][-1].get("mlflow_run_id"))
    from aifactory_train.records.consent import provenance_tags

    entries.update(provenance_tags(document))  # the DUO codes and the purpose the model was trained under
    return entries


def embed_in_onnx(path: Path, document: dict[str, Any]) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)  # large weights kept apart stay where they are
    existing = {p.key: p.value for p in model.metadata_props}
    onnx.helper.set_model_props(model, {**existing, **onnx_metadata(document)})  # replaces the list
    onnx.save(model, str(path))
