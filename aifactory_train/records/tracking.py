"""MLflow tracking shared by every recipe.

Lightning's MLFlowLogger records metrics per step and epoch (it logs from global rank 0 only); this
module adds what a run must carry for lineage and reproducibility: the resolved config (flattened params
+ YAML artifact), git commit and dirty flag, package versions, hardware, the dataset inputs with a
full-content digest and data-card tags, and the run's artifacts. It also checks, before any data is
read, that the tracking store can be reached, so a wrong URI fails in seconds, not after training.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import subprocess
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path
from typing import Any

from aifactory_train.errors import TrackingError
from aifactory_train.records.masking import connectable, has_credentials, redact_text, redact_uri, redacted

log = logging.getLogger(__name__)

TRACKING_STATE_FILE = "tracking.json"  # in the run folder: lets a resumed run log into the same MLflow run
MLFLOW_DIGEST_CHARS = 32  # MLflow caps dataset digests at 36 characters; the full SHA-256 is in the tags
VERSIONED_PACKAGES = (
    "aifactory-train", "torch", "torchvision", "lightning", "deepspeed", "hydra-core", "mlflow",
    "datasets", "torchmetrics", "transformers", "peft", "numpy",
)


def is_global_zero() -> bool:
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _health_request(uri: str) -> urllib.request.Request:
    """GET <server>/health, with the credentials MLflow would send: urllib takes no user:password from a URL (it
    would look the whole ``user:pw@host`` up as a host name), so they go into the Authorization header."""
    import base64
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri.rstrip("/"))
    host = parts.netloc.rpartition("@")[2]
    request = urllib.request.Request(urlunsplit(parts._replace(netloc=host)) + "/health")
    user, password = parts.username, parts.password
    if user is None:
        user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        request.add_header("Authorization", "Bearer " + os.environ["MLFLOW_TRACKING_TOKEN"])
    elif user is not None and password is not None:
        basic = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
        request.add_header("Authorization", "Basic " + basic)
    return request


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """Fail now, with the URI (its password masked) and a way out, if the tracking store cannot be used."""
    hint = "start the server, point tracking.uri at a reachable store, or pass tracking=none"
    shown = redact_uri(uri)
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(_health_request(uri), timeout=timeout_s) as response:
                if response.status != 200:
                    raise TrackingError(f"tracking.uri '{shown}': server answered HTTP {response.status}; {hint}")
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = redact_text(str(getattr(err, "reason", err)))
            raise TrackingError(f"tracking.uri '{shown}': the MLflow server cannot be reached ({reason}); {hint}") from None
        return
    if uri.startswith("sqlite:///"):
        db_path = Path(uri[len("sqlite:///"):])
        if not db_path.parent.is_dir():
            raise TrackingError(f"tracking.uri '{shown}': folder '{db_path.parent}' does not exist; {hint}")
        if not db_path.exists():
            # a new store: opening it would create it, and a run refused later (bad data, the owner's terms) would
            # leave an mlflow.db behind; MLflow creates it when the run starts
            if not os.access(db_path.parent, os.W_OK | os.X_OK):
                raise TrackingError(f"tracking.uri '{shown}': folder '{db_path.parent}' is not writable; {hint}")
            return
    try:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as err:  # noqa: BLE001 - any failure here means the store is unusable
        # a database driver's message may quote the URI it was given
        raise TrackingError(f"tracking.uri '{shown}': the store cannot be used "
                            f"({type(err).__name__}: {redact_text(str(err))}); {hint}") from None


def ensure_experiment(uri: str, name: str) -> str:
    """The experiment's id, creating the experiment if needed. Safe when several jobs (a sweep on a cluster) start
    at once on one store: the one that loses the race to create it finds it (MLflow itself would fail with a
    UNIQUE-constraint error, as Lightning's MLFlowLogger did here for the second job of a sweep)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def log_dataset_inputs(client, run_id: str, inputs: list, attempts: int = 4) -> None:
    """``client.log_inputs``, tried again when another run won a race for the same dataset row.

    MLflow's SQL store looks a dataset up and then inserts it, in one transaction but not atomically: when runs of
    one experiment log the same dataset at the same moment (the jobs of a sweep start together), all but one fail
    with ``UNIQUE constraint failed: datasets.experiment_id, datasets.name, datasets.digest``, and the job died
    before training. The failed transaction is rolled back whole, and the winner's row is then in the store, so the
    next try only links it to this run."""
    from mlflow.exceptions import MlflowException

    for attempt in range(1, attempts + 1):
        try:
            client.log_inputs(run_id, datasets=inputs)
            return
        except MlflowException as err:
            if attempt == attempts:
                raise
            log.info("logging dataset inputs lost a race with another run (%s); trying again", str(err)[:120])
            time.sleep(0.2 * attempt)


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Flatten nested dicts into dotted keys; lists become their string form (MLflow params are strings)."""
    flat: dict[str, str] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    flat[prefix.rstrip(".")] = str(tree)[:6000]
    return flat


def git_state(start: Path) -> dict[str, Any]:
    """Commit and dirty flag of the git checkout that holds ``start`` ({} outside git)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=start, capture_output=True, text=True, timeout=10, check=True).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
        root = git("rev-parse", "--show-toplevel").strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "dirty": dirty, "root": root}


def package_versions() -> dict[str, str]:
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    versions["python"] = platform.python_version()
    return versions


def hardware() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "host": platform.node(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu_count"] = torch.cuda.device_count()
        info["gpu_name"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    return info


WITHDRAWN_TAG = "aift.data.withdrawn"  # lineage.read_datacard's "withdrawn": "LIST (sha256 X, N ids): ...; ..."
_RECORDED_LIST = re.compile(r"(\S+) \(sha256 ([0-9a-f]{64}), \d+ ids\)")


def recorded_withdrawals(tags: dict[str, str]) -> dict[str, str]:
    """The withdrawal lists a run applied, as it recorded them: list path -> SHA-256 ({} for a run without one)."""
    return {m.group(1): m.group(2) for m in _RECORDED_LIST.finditer(tags.get(WITHDRAWN_TAG) or "")}


def withdrawal_status(tags: dict[str, str], current: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Whether a run trained before the data's current withdrawal lists (``withdrawal.summary``): a list it did not
    apply, or applied in another version (its SHA-256 differs), means it may have trained on records withdrawn
    since, and it and its models should be retrained. None when the data has no withdrawal list."""
    if not current:
        return None
    recorded = recorded_withdrawals(tags)
    lists = [{"list": w["list"], "current_sha256": w["sha256"], "run_sha256": recorded.get(w["list"])}
             for w in current]
    return {"before_current_list": any(w["run_sha256"] != w["current_sha256"] for w in lists), "lists": lists}


def runs_trained_on(uri: str, lineage, withdrawals: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Every run in the store (all experiments; training and eval runs) that used one or more splits of
    ``lineage``'s data, found by digest, or the data at its root (``aift.data.root``): the data owner's question
    "which models were trained on my data?".

    A run matches a split when one of its MLflow dataset inputs has that split's digest, so a run that trained on
    this train split with other validation data is listed too, with the splits it shares. A run on the same root
    whose digests differ (it read records withdrawn since, or files changed) is listed with no shared split.
    ``withdrawals``: the data's current withdrawal lists (``withdrawal.summary``); each run then says whether it
    trained before them (``withdrawal``: :func:`withdrawal_status`)."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise TrackingError(f"tracking.uri '{redact_uri(uri)}': there is no MLflow store at that path (no run has used it yet); "
                            "point tracking.uri at the store the training runs logged to")
    check_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    split_of = {split.digest[:MLFLOW_DIGEST_CHARS]: name for name, split in lineage.splits.items()}
    quoted = ", ".join(f"'{d}'" for d in split_of)
    experiments = {e.experiment_id: e.name for e in client.search_experiments(view_type=ViewType.ALL)}
    if not experiments or not split_of:
        return []
    found = []
    runs = {run.info.run_id: run for run in _all_runs(client, list(experiments), f"dataset.digest IN ({quoted})")}
    root = str(Path(lineage.root).resolve())
    if "'" not in root:  # MLflow's filter has no escape for a quote
        for run in _all_runs(client, list(experiments), f"tags.`aift.data.root` = '{root}'"):
            runs.setdefault(run.info.run_id, run)
    for run in runs.values():
        tags = run.data.tags
        splits = sorted({split_of[d.dataset.digest] for d in run.inputs.dataset_inputs if d.dataset.digest in split_of})
        found.append({
            "run_id": run.info.run_id, "experiment": experiments.get(run.info.experiment_id),
            "run_name": run.info.run_name, "kind": tags.get("aift.run_kind", "train"), "status": run.info.status,
            "deleted": run.info.lifecycle_stage == "deleted",  # soft-deleted: its artifacts may still exist
            "start_time": time.strftime("%Y-%m-%d %H:%M", time.localtime(run.info.start_time / 1000)),
            "splits": splits, "all_data": tags.get("aift.data.digest") == lineage.digest,
            "recipe": run.data.params.get("recipe.name"), "best_checkpoint": tags.get("aift.checkpoint.best"),
            "output_dir": tags.get("aift.output_dir"),
            "datacard": {k[len("aift.data."):]: v for k, v in tags.items()
                         if k.startswith("aift.data.") and k[len("aift.data."):] in ("owner", "license", "consent")},
            # where its models went: `aift export` tags the training run ("<format> <folder> <time>"), and
            # export.register makes registered model versions of it
            "exports": sorted(v for k, v in tags.items() if k.startswith("aift.export.")),
            "registered": [f"{v.name} version {v.version}" for v in
                           client.search_model_versions(f"run_id = '{run.info.run_id}'")],
            "withdrawal": withdrawal_status(tags, withdrawals or []),
        })
    return sorted(found, key=lambda r: r["start_time"])


def _all_runs(client, experiment_ids: list[str], filter_string: str):
    from mlflow.entities import ViewType

    token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, run_view_type=ViewType.ALL,
                                  max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


class Tracker:
    """One tracking run per training job; a no-op when ``tracking.backend`` is ``none``."""

    def __init__(self, tracking_cfg: dict[str, Any], run_dir: Path, resume: bool):
        self.cfg = tracking_cfg
        self.run_dir = run_dir
        self.enabled = tracking_cfg["backend"] == "mlflow"
        self.uri = tracking_cfg.get("uri")  # the live URI, to connect with; never written down
        self.recorded_uri = redact_uri(self.uri)  # what summaries, records and tracking.json say
        self._resume_run_id = None
        self.logger = None
        self._system_metrics = None
        if not self.enabled:
            return
        if is_global_zero():
            # only rank 0 touches the store: ranks started together (srun) would otherwise race to create a new
            # sqlite store and break its schema migration
            check_tracking_uri(self.uri)
        state_file = run_dir / TRACKING_STATE_FILE
        if resume and state_file.is_file():
            state = json.loads(state_file.read_text())
            if state.get("tracking_uri") == self.recorded_uri:
                self._resume_run_id = state.get("run_id")

    def lightning_logger(self):
        """The MLflow logger on rank 0; None on the other ranks, which log nothing (and must not open the store:
        ranks that srun starts together would race to create a new sqlite store)."""
        if not self.enabled or not is_global_zero():
            return None
        from lightning.pytorch.loggers import MLFlowLogger

        if has_credentials(self.uri):
            # MLflow prints "View run ... at: <URI>" with the password in it when a run ends; finish() logs the link
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"

        ensure_experiment(self.uri, self.cfg["experiment"])  # before Lightning's get-or-create, which races
        self.logger = MLFlowLogger(
            experiment_name=self.cfg["experiment"],
            run_name=self.cfg.get("run_name") or self.run_dir.name,
            tracking_uri=self.uri,
            tags=dict(self.cfg.get("tags") or {}),
            run_id=self._resume_run_id,
            log_model=False,
        )
        return self.logger

    @property
    def run_id(self) -> str | None:
        if self.logger is None or not is_global_zero():
            return self._resume_run_id
        return self.logger.run_id

    @property
    def client(self):
        return self.logger.experiment

    def log_run_start(self, resolved_cfg: dict[str, Any], config_yaml: Path, lineage) -> None:
        """Config, environment and data lineage; once per run, from global rank 0."""
        if self.logger is None or not is_global_zero():
            return
        run_id = self.logger.run_id
        (self.run_dir / TRACKING_STATE_FILE).write_text(
            json.dumps({"run_id": run_id, "tracking_uri": self.recorded_uri, "experiment": self.cfg["experiment"]},
                       indent=2)
        )
        if self._resume_run_id:
            log.info("resuming MLflow run %s", run_id)
            # as mlflow.start_run(run_id=...) does: a run that training continues is running again (a finished run
            # resumed for more epochs showed FINISHED while it trained, and the system-metrics sampler stopped)
            self.client.update_run(run_id, status="RUNNING")
            return  # params, inputs and environment were logged when the run started
        resolved_cfg = redacted(resolved_cfg)  # callers pass the redacted config; a password must not reach a param
        self.logger.log_hyperparams({k: v for k, v in flatten(resolved_cfg).items() if not k.startswith("hydra.")})
        client = self.client
        client.log_artifact(run_id, str(config_yaml))
        environment = {"packages": package_versions(), "hardware": hardware(), "git": git_state(Path.cwd())}
        if not environment["git"]:
            environment["git"] = git_state(Path(__file__).resolve().parent)
        env_file = self.run_dir / "environment.json"
        env_file.write_text(json.dumps(environment, indent=2))
        client.log_artifact(run_id, str(env_file))
        tags = {f"aift.version.{k}": v for k, v in environment["packages"].items()}
        tags.update({f"aift.hardware.{k}": str(v) for k, v in environment["hardware"].items()})
        tags["aift.output_dir"] = str(self.run_dir.resolve())
        if environment["git"]:
            tags["mlflow.source.git.commit"] = environment["git"]["commit"]
            tags["aift.git.dirty"] = str(environment["git"]["dirty"]).lower()
        if lineage is not None:
            tags["aift.data.digest"] = lineage.digest
            tags["aift.data.root"] = str(Path(lineage.root).resolve())
            tags.update({f"aift.data.{k}": v for k, v in lineage.datacard.items()})
            tags["aift.data.skipped_files"] = str(len(lineage.skipped_files))
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        if lineage is not None:
            self._log_dataset_inputs(lineage)

    def _log_dataset_inputs(self, lineage) -> None:
        import warnings

        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag

        inputs = []
        for split in lineage.splits.values():
            name, digest = f"{lineage.name}-{split.name}", split.digest[:MLFLOW_DIGEST_CHARS]
            with warnings.catch_warnings():  # MLflow's hints on source kinds and int columns do not apply here
                warnings.simplefilter("ignore", UserWarning)
                if split.dataset is None:  # the recipe keeps no table of its records: the split's digest and place
                    from mlflow.data.dataset_source_registry import resolve_dataset_source
                    from mlflow.data.meta_dataset import MetaDataset

                    source = resolve_dataset_source(Path(lineage.root).resolve().as_uri())
                    dataset = MetaDataset(source, name=name, digest=digest)
                else:
                    dataset = mlflow.data.from_huggingface(
                        split.dataset, name=name, digest=digest,
                        targets="label" if "label" in split.dataset.column_names else None,
                        source=str(Path(lineage.root).resolve()),
                    )
                entity = dataset._to_mlflow_entity()
            tags = [InputTag(key="mlflow.data.context", value=split.name)]
            inputs.append(DatasetInput(dataset=entity, tags=tags))
        log_dataset_inputs(self.client, self.logger.run_id, inputs)

    def start_system_metrics(self) -> None:
        """MLflow's system metrics monitor (a thread sampling psutil and NVML) on global rank 0, logging into this
        run as ``system/*``; a resumed run continues its steps. Rank 0's node only: the other nodes' GPUs are
        alike, and one sampler keeps the store's load flat."""
        if self.logger is None or not is_global_zero() or not self.cfg.get("system_metrics", False):
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # four INFO lines per run, no news
        self._system_metrics = SystemMetricsMonitor(
            self.logger.run_id, sampling_interval=float(self.cfg.get("system_metrics_interval_s", 10.0)),
            resume_logging=self._resume_run_id is not None, tracking_uri=self.uri)
        self._system_metrics.start()

    def stop_system_metrics(self) -> None:
        """Stop the sampler and write what it holds (before the run ends, or when the job stops to be resumed)."""
        if self._system_metrics is not None:
            self._system_metrics.finish()
            self._system_metrics = None

    def log_artifacts(self, paths: list[Path], artifact_path: str | None = None) -> None:
        if self.logger is None or not is_global_zero():
            return
        for path in paths:
            if path.is_dir():
                self.client.log_artifacts(self.logger.run_id, str(path), artifact_path or path.name)
            elif path.is_file():
                self.client.log_artifact(self.logger.run_id, str(path), artifact_path)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.logger is None or not is_global_zero():
            return
        self.logger.log_metrics(metrics, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.logger is None or not is_global_zero():
            return
        for key, value in tags.items():
            self.client.set_tag(self.logger.run_id, key, value)

    def finish(self, status: str) -> None:
        self.stop_system_metrics()
        if self.logger is not None and is_global_zero():
            self.logger.finalize(status)
            if has_credentials(self.uri) and self.uri.startswith(("http://", "https://")):
                experiment_id = self.client.get_run(self.logger.run_id).info.experiment_id
                base = connectable(redact_uri(self.uri), None).rstrip("/")  # the server's address, no user
                log.info("MLflow run: %s/#/experiments/%s/runs/%s", base, experiment_id, self.logger.run_id)
