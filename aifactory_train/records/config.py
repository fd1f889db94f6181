"""Config validation: before any data is read or process launched, the composed config is checked
against typed schemas (OmegaConf structured configs built from dataclasses).

Hydra already rejects unknown config-group options (listing the valid ones) and overrides of keys that
do not exist. This module adds what Hydra cannot know: types and allowed values of every key. The
shared sections are defined here; each recipe extends :class:`RunConfig` with its ``data``, ``model``,
``optim`` and ``loss`` sections (``recipe.schema`` in its recipe config names the class).
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional

from aifactory_train.errors import ConfigError

PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
PROFILERS = (None, "simple", "advanced", "pytorch")  # Lightning's profilers
STRATEGIES = ("single", "ddp", "fsdp", "deepspeed")
GPU_STRATEGIES = ("fsdp", "deepspeed")  # on CPU only with strategy.cpu_smoke=true
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
TRACKING_BACKENDS = ("mlflow", "none")
ENERGY_METERS = ("auto", "nvml", "rapl", "nvml+rapl", "none")


def check_choice(key: str, value: Any, valid: tuple | list) -> None:
    if value not in valid:
        raise ConfigError(f"config key '{key}': '{value}' is not valid; valid values: {', '.join(map(str, valid))}")


def check(condition: bool, key: str, value: Any, expected: str) -> None:
    if not condition:
        raise ConfigError(f"config key '{key}': {value!r} is not valid; expected {expected}")


SEED_RANGE = (0, 2**32 - 1)  # what numpy (and Lightning's seed_everything) accept
CPU_PRECISIONS = ("auto", "32-true", "32", "64-true", "bf16-mixed", "bf16-true")
SHARDED_PRECISIONS = ("auto", "32-true", "32", "16-mixed", "bf16-mixed", "16-true", "bf16-true")  # FSDP, DeepSpeed


def _is_batch_limit(value: Any) -> bool:
    # Lightning: an int counts batches, a float in [0, 1] is a fraction of the epoch.
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 0
    return isinstance(value, float) and 0.0 <= value <= 1.0


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite int or float: inf and nan pass every comparison check they should fail (nan > 0 is False, but
    inf > 0 is True), and reach torch as a learning rate or a clipping norm."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    precision: str = "auto"
    max_epochs: int = 10
    max_steps: int = -1
    limit_train_batches: Any = 1.0
    limit_val_batches: Any = 1.0
    limit_test_batches: Any = 1.0
    overfit_batches: Any = 0.0
    val_check_interval: Any = 1.0
    check_val_every_n_epoch: Optional[int] = 1
    log_every_n_steps: int = 10
    accumulate_grad_batches: int = 1
    # samples per optimizer step over all ranks: the accumulation is derived from it, data.batch_size (per device)
    # and the rank count, so the optimisation (and its learning rate) stays the same on 1 GPU or 64
    global_batch_size: Optional[int] = None
    gradient_clip_val: Optional[float] = None
    deterministic: Any = False
    benchmark: Optional[bool] = None
    enable_progress_bar: bool = True
    profiler: Optional[str] = None  # Lightning's simple | advanced | pytorch, into <run>/profiler

    def check(self) -> None:
        check_choice("trainer.accelerator", self.accelerator, ACCELERATORS)
        check(self.profiler in PROFILERS, "trainer.profiler", self.profiler, "null, simple, advanced or pytorch")
        check_choice("trainer.precision", self.precision, PRECISIONS)
        devices_ok = self.devices == "auto" or (isinstance(self.devices, int) and self.devices >= 1) or (
            isinstance(self.devices, list) and all(isinstance(d, int) for d in self.devices)
        )
        check(devices_ok, "trainer.devices", self.devices, "'auto', a count >= 1 or a list of device indices")
        if isinstance(self.devices, list):  # Lightning: "devices=[]" means no device, duplicates one twice
            check(len(self.devices) >= 1 and all(d >= 0 for d in self.devices)
                  and len(set(self.devices)) == len(self.devices), "trainer.devices", self.devices,
                  "a non-empty list of distinct device indices >= 0, e.g. [0, 1]")
        check(self.num_nodes >= 1, "trainer.num_nodes", self.num_nodes, "an integer >= 1")
        # 0 epochs or steps: Lightning "trains" nothing, writes an untrained checkpoint and reports success
        check(self.max_epochs == -1 or self.max_epochs >= 1, "trainer.max_epochs", self.max_epochs,
              "an integer >= 1, or -1 for no limit (then trainer.max_steps ends the run)")
        check(self.max_steps == -1 or self.max_steps >= 1, "trainer.max_steps", self.max_steps,
              "an integer >= 1, or -1 for no limit")
        for name in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "overfit_batches"):
            value = getattr(self, name)
            check(_is_batch_limit(value), f"trainer.{name}", value, "a batch count (int >= 0) or a fraction in [0, 1]")
        # 0 for val/test switches that stage off; for training it leaves nothing to train on
        check(self.limit_train_batches not in (0, 0.0), "trainer.limit_train_batches", self.limit_train_batches,
              "a batch count >= 1 or a fraction in (0, 1]; 0 trains on nothing")
        interval = self.val_check_interval
        check((_is_int(interval) and interval >= 1) or (isinstance(interval, float) and 0.0 < interval <= 1.0),
              "trainer.val_check_interval", interval,
              "a fraction of the training epoch in (0, 1] (a float: 0.25, 1.0) or a number of training batches >= 1 "
              "(an int: 50)")
        check(self.check_val_every_n_epoch is None or self.check_val_every_n_epoch >= 1,
              "trainer.check_val_every_n_epoch", self.check_val_every_n_epoch,
              "null (validate by trainer.val_check_interval only) or an integer >= 1")
        check(self.gradient_clip_val is None or (_is_number(self.gradient_clip_val) and self.gradient_clip_val >= 0),
              "trainer.gradient_clip_val", self.gradient_clip_val, "null (no clipping) or a gradient norm >= 0")
        check(self.deterministic in (True, False, "warn"), "trainer.deterministic", self.deterministic,
              "true, false or warn (Lightning's choices)")
        # cudnn.benchmark picks the fastest kernels, which need not be deterministic: torch ignores one of the two
        check(not (self.deterministic is True and self.benchmark is True), "trainer.benchmark", self.benchmark,
              "null or false with trainer.deterministic=true (cudnn's benchmark mode is not deterministic)")
        check(self.log_every_n_steps >= 1, "trainer.log_every_n_steps", self.log_every_n_steps, "an integer >= 1")
        check(
            self.accumulate_grad_batches >= 1,
            "trainer.accumulate_grad_batches",
            self.accumulate_grad_batches,
            "an integer >= 1",
        )
        check(self.global_batch_size is None or self.global_batch_size >= 1, "trainer.global_batch_size",
              self.global_batch_size, "null or a number of samples per optimizer step >= 1")
        check(self.global_batch_size is None or self.accumulate_grad_batches == 1, "trainer.accumulate_grad_batches",
              self.accumulate_grad_batches, f"1 when trainer.global_batch_size is set ({self.global_batch_size}): the "
              f"accumulation is derived from it; set one of the two")

    def known_ranks(self, strategy: str) -> int | None:
        """The job's rank count where the config fixes it (None for ``devices: auto`` on a multi-device strategy,
        which Lightning resolves on the node)."""
        if isinstance(self.devices, int):
            return self.devices * self.num_nodes
        if isinstance(self.devices, list):
            return len(self.devices) * self.num_nodes
        return self.num_nodes if strategy == "single" else None  # single: one device per node (trainer_kwargs)


@dataclass
class StrategyConfig:
    """One schema for every strategy; each configs/strategy/<name>.yaml sets what applies to it."""

    name: str = "single"
    process_group_backend: Optional[str] = None
    # A CPU run of a GPU strategy (FSDP, DeepSpeed) with gloo: checks the config on a laptop or in CI.
    cpu_smoke: bool = False
    # ddp
    find_unused_parameters: bool = False
    gradient_as_bucket_view: bool = True
    static_graph: bool = False
    # fsdp
    sharding_strategy: str = "FULL_SHARD"
    auto_wrap_policy: List[str] = field(default_factory=list)  # layer classes (dotted paths) to shard one by one
    activation_checkpointing: List[str] = field(default_factory=list)  # layer classes to recompute in backward
    cpu_offload: bool = False
    state_dict_type: str = "full"
    # deepspeed
    stage: int = 2
    offload_optimizer: str = "none"
    offload_parameters: str = "none"
    nvme_path: Optional[str] = None
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    allgather_bucket_size: int = 200_000_000
    reduce_bucket_size: int = 200_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    stage3_max_live_parameters: int = 1_000_000_000

    def check(self) -> None:
        check_choice("strategy.name", self.name, STRATEGIES)
        if self.process_group_backend is not None:
            check_choice("strategy.process_group_backend", self.process_group_backend, ("nccl", "gloo"))
        if self.name == "fsdp":
            check_choice("strategy.sharding_strategy", self.sharding_strategy,
                         ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"))
            check_choice("strategy.state_dict_type", self.state_dict_type, ("full", "sharded"))
        if self.name == "deepspeed":
            check_choice("strategy.stage", self.stage, (1, 2, 3))
            check_choice("strategy.offload_optimizer", self.offload_optimizer, OFFLOAD_DEVICES)
            check_choice("strategy.offload_parameters", self.offload_parameters, OFFLOAD_DEVICES)
            if self.offload_parameters != "none":
                check(self.stage == 3, "strategy.offload_parameters", self.offload_parameters,
                      f"'none' with ZeRO stage {self.stage}: parameter offload needs strategy.stage=3 "
                      f"(strategy=deepspeed_zero3_offload)")
            if "nvme" in (self.offload_optimizer, self.offload_parameters):
                check(bool(self.nvme_path), "strategy.nvme_path", self.nvme_path,
                      "a local NVMe folder for offload_*=nvme")
            for key in ("allgather_bucket_size", "reduce_bucket_size", "stage3_prefetch_bucket_size"):
                check(getattr(self, key) > 0, f"strategy.{key}", getattr(self, key), "a number of elements > 0")


@dataclass
class NodeShape:
    gpus: int = 0
    cpus: int = 1
    memory_gb: int = 1


@dataclass
class ProjectConfig:
    """A project: a Slurm sub-account under its track's account (aift cluster accounts creates it)."""

    track: str = "???"
    users: List[str] = field(default_factory=list)  # the OS users that may charge jobs to it


START_CHOICES = ("now", "offpeak", "grid")


@dataclass
class LaunchConfig:
    """How `aift launch` queues the job: ``start`` now, in the profile's next off-peak window (cluster.offpeak), or
    at the start that minimises the facility's grid signal over the job's time (cluster.grid_signal)."""

    start: str = "now"

    def check(self) -> None:
        check_choice("launch.start", self.start, START_CHOICES)


@dataclass
class ClusterConfig:
    """Where a job runs. ``scheduler: none`` is this machine; ``slurm`` profiles feed `aift launch`."""

    name: str = "local"
    scheduler: str = "none"
    partition: Optional[str] = None
    qos: Optional[str] = None
    time_limit: Optional[str] = None
    allocation: Optional[str] = None
    accounts: Dict[str, Optional[str]] = field(default_factory=dict)
    node: NodeShape = field(default_factory=NodeShape)
    cpus_per_task: int = 1
    requeue_signal_seconds: int = 120
    env: Dict[str, str] = field(default_factory=dict)
    project: Optional[str] = None  # a project of cluster.projects (its Slurm sub-account is charged); null: the track's
    projects: Dict[str, ProjectConfig] = field(default_factory=dict)
    shares: Dict[str, int] = field(default_factory=dict)  # track -> Slurm fair-share (aift cluster accounts)
    timezone: str = "Europe/Amsterdam"  # of the off-peak hours
    offpeak: List[str] = field(default_factory=list)  # local windows "HH:MM-HH:MM" (22:00-06:00 crosses midnight)
    grid_signal: Optional[str] = None  # the facility's hourly grid-signal CSV (launch.start=grid)
    # `aift plan` (aifactory_train/launch/plan.py): the GPU's benchmark profile (benchmarks/profiles/NAME.yaml), the GPU-hours
    # each track was granted, the grid's carbon intensity and the all-reduce bandwidth between nodes where no
    # benchmark result measured it
    hardware: Optional[str] = None
    allocation_gpu_hours: Dict[str, float] = field(default_factory=dict)
    grid_g_co2_per_kwh: Optional[float] = None
    internode_busbw_gbps: Optional[float] = None
    secure_partition: Optional[str] = None  # where `aift launch` sends a profile=secure job (records/secure.py)

    def check(self) -> None:
        check_choice("cluster.scheduler", self.scheduler, ("none", "slurm"))
        for track, hours in self.allocation_gpu_hours.items():
            check(_is_number(hours) and hours >= 0, f"cluster.allocation_gpu_hours.{track}", hours,
                  "a number of GPU-hours >= 0")
        for key in ("grid_g_co2_per_kwh", "internode_busbw_gbps"):
            value = getattr(self, key)
            check(value is None or (_is_number(value) and value > 0), f"cluster.{key}", value, "a number > 0, or null")
        if self.scheduler == "slurm":
            check(bool(self.partition), "cluster.partition", self.partition, "the Slurm partition to submit to")
            check(self.allocation in self.accounts, "cluster.allocation", self.allocation,
                  f"one of the tracks in cluster.accounts ({', '.join(self.accounts) or 'none defined'})")
            from aifactory_train.records.tracks import check_tracks

            check_tracks(self)
            check(bool(self.time_limit) and re.fullmatch(r"(\d+-)?\d{1,2}:\d{2}:\d{2}", self.time_limit) is not None,
                  "cluster.time_limit", self.time_limit, "Slurm's [days-]hh:mm:ss")


@dataclass
class TrackingConfig:
    backend: str = "mlflow"
    uri: Optional[str] = None
    experiment: str = "default"
    run_name: Optional[str] = None
    log_checkpoints: bool = False
    system_metrics: bool = True
    system_metrics_interval_s: float = 10.0
    tags: Dict[str, str] = field(default_factory=dict)

    def check(self) -> None:
        check_choice("tracking.backend", self.backend, TRACKING_BACKENDS)
        if self.backend == "mlflow":
            check(bool(self.uri), "tracking.uri", self.uri, "a tracking URI such as sqlite:///mlflow.db or http://host:5000")
        check(_is_number(self.system_metrics_interval_s) and self.system_metrics_interval_s > 0, "tracking.system_metrics_interval_s", self.system_metrics_interval_s,
              "a number of seconds > 0")


@dataclass
class EnergyConfig:
    """Energy per training run from hardware counters (aifactory_train.records.energy), into summary.json and MLflow."""

    meter: str = "auto"  # auto: NVML for GPUs and powercap (RAPL) for CPU packages, each where it can be read
    sample_every_s: float = 30.0
    powercap_dir: str = "/sys/class/powercap"
    budget_kwh: Optional[float] = None  # stop (checkpoint, resumable) when the measured energy reaches it; `aift plan`

    def check(self) -> None:
        check_choice("energy.meter", self.meter, ENERGY_METERS)
        check(_is_number(self.sample_every_s) and self.sample_every_s > 0, "energy.sample_every_s", self.sample_every_s, "a number of seconds > 0")
        check(self.budget_kwh is None or (_is_number(self.budget_kwh) and self.budget_kwh > 0), "energy.budget_kwh",
              self.budget_kwh, "a number of kWh > 0, or null (no budget)")


@dataclass
class PathsConfig:
    data_dir: str = "data"
    output_dir: str = "outputs"


@dataclass
class RecipeSection:
    name: str = "?"
    task: str = "?"
    description: str = ""
    data_format: str = ""
    synth: str = ""
    deidentify: str = ""  # recipes on sensitive text: the `aift data deidentify` step
    # a card key (e.g. deidentified): data whose nearest card does not say KEY: true is used under profile=secure
    # only (aifactory_train/records/secure.py)
    secure_unless_card: Optional[str] = None
    schema: str = ""
    module: Dict[str, Any] = field(default_factory=dict)
    monitor: str = "val/loss"
    monitor_mode: str = "min"

    def check(self) -> None:
        check_choice("recipe.monitor_mode", self.monitor_mode, ("min", "max"))
        check("_target_" in self.module, "recipe.module", self.module, "a mapping with a _target_ class path")


def _is_optimizer_class(path: str) -> bool:
    try:
        from hydra.utils import get_class
        import torch

        return issubclass(get_class(path), torch.optim.Optimizer)
    except Exception:  # noqa: BLE001 - not importable, not a class: not an optimizer
        return False


@dataclass
class OptimConfig:
    """Optimizer + warmup/cosine schedule (aifactory_train.run.schedules), shared by the recipes."""

    name: str = "adamw"  # adamw | sgd; or any optimizer class with _target_ (run/optim.py)
    _target_: Optional[str] = None  # e.g. torch.optim.RAdam; then `args` are its keyword arguments
    args: Dict[str, Any] = field(default_factory=dict)
    lr: float = 0.002
    weight_decay: float = 0.05
    momentum: float = 0.9
    warmup_steps: int = 20
    min_lr_ratio: float = 0.01

    def check(self) -> None:
        check_choice("optim.name", self.name, ("adamw", "sgd"))
        if self._target_ is not None:
            check(isinstance(self._target_, str) and _is_optimizer_class(self._target_), "optim._target_",
                  self._target_, "the class path of a torch.optim.Optimizer, e.g. torch.optim.RAdam")
        check(_is_number(self.lr) and self.lr > 0, "optim.lr", self.lr, "a finite number > 0, e.g. 1e-3")
        check(_is_number(self.weight_decay) and self.weight_decay >= 0, "optim.weight_decay", self.weight_decay,
              "a finite number >= 0 (0: none)")
        check(_is_number(self.momentum) and 0 <= self.momentum < 1, "optim.momentum", self.momentum,
              "a number in [0, 1) (sgd only)")
        check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "an integer >= 0")
        check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")


@dataclass
class CheckpointConfig:
    """When last.ckpt is (also) written during an epoch, so a preempted or killed job loses little work."""

    every_n_train_steps: Optional[int] = None
    every_n_minutes: Optional[float] = None
    # resume a DeepSpeed folder whose shards fail the weights-only check (they can run code when unpickled)
    trust: bool = False

    def check(self) -> None:
        check(self.every_n_train_steps is None or self.every_n_train_steps >= 1, "checkpoint.every_n_train_steps",
              self.every_n_train_steps, "null or an integer >= 1")
        check(self.every_n_minutes is None or (_is_number(self.every_n_minutes) and self.every_n_minutes > 0),
              "checkpoint.every_n_minutes",
              self.every_n_minutes, "null or a number of minutes > 0")
        check(self.every_n_train_steps is None or self.every_n_minutes is None, "checkpoint.every_n_minutes",
              self.every_n_minutes, "null when checkpoint.every_n_train_steps is set (one trigger)")


@dataclass
class EarlyStoppingConfig:
    """Stop when ``recipe.monitor`` has not improved for ``patience`` validations (Lightning's EarlyStopping)."""

    patience: Optional[int] = None  # null: off
    min_delta: float = 0.0

    def check(self) -> None:
        check(self.patience is None or self.patience >= 1, "early_stopping.patience", self.patience,
              "null (off) or a number of validations >= 1")
        check(_is_number(self.min_delta) and self.min_delta >= 0, "early_stopping.min_delta", self.min_delta,
              "a finite number >= 0")


from aifactory_train.records.audit import AuditConfig  # noqa: E402 - the sections of issue 19, in their own modules
from aifactory_train.records.consent import RunSection  # noqa: E402
from aifactory_train.records.secure import ProfileConfig  # noqa: E402


@dataclass
class PredictOptions:
    """The ``predict`` section: what `aift predict` needs of every recipe. A recipe with options of its own (a score
    threshold, the field its text is in) subclasses this in its schema module and declares
    ``predict: MyPredictOptions = field(default_factory=MyPredictOptions)`` in its RunConfig subclass; the defaults
    go in its recipe config under ``predict:`` as well, so that they can be overridden on the command line."""

    batch_size: int = 8  # files per forward pass
    num_workers: int = 2  # processes that read and decode the next files (0: the main process)
    draw: bool = False  # also draw the predictions (recipes whose module has PREDICT_DRAWS)

    def check(self) -> None:
        check(_is_int(self.batch_size) and self.batch_size >= 1, "predict.batch_size", self.batch_size,
              "an integer >= 1")
        check(_is_int(self.num_workers) and self.num_workers >= 0, "predict.num_workers", self.num_workers,
              "an integer >= 0 (0: files are read in the main process)")


@dataclass
class DisclosureOptions:
    """``export.disclosure``: the check an export of sensitive data must pass before it is released (registered);
    the defaults and the literature behind them: aifactory_train/run/release.py."""

    when: str = "auto"  # auto: when a data card says sensitivity: high or deidentified: true | always
    records: int = 64  # training and held-out records each test scores
    max_membership_auc: float = 0.75  # loss-threshold attack (Yeom et al. 2018; Carlini et al. 2022)
    max_verbatim_gap: float = 0.2  # language models: verbatim fraction, training minus held-out (Carlini 2019/2021)
    min_vocab_records: int = 2  # tokenizer entries must occur in at least this many training records
    min_vocab_chars: int = 4  # ... when they hold at least this many letters/digits

    def check(self) -> None:
        check_choice("export.disclosure.when", self.when, ("auto", "always"))
        check(isinstance(self.records, int) and self.records >= 2, "export.disclosure.records", self.records,
              "an integer >= 2")
        check(0.5 <= self.max_membership_auc <= 1.0, "export.disclosure.max_membership_auc",
              self.max_membership_auc, "a number in [0.5, 1.0] (0.5: no membership signal allowed)")
        check(0.0 <= self.max_verbatim_gap <= 1.0, "export.disclosure.max_verbatim_gap", self.max_verbatim_gap,
              "a fraction in [0, 1]")
        check(self.min_vocab_records >= 1, "export.disclosure.min_vocab_records", self.min_vocab_records,
              "an integer >= 1")
        check(self.min_vocab_chars >= 1, "export.disclosure.min_vocab_chars", self.min_vocab_chars,
              "an integer >= 1")


@dataclass
class ExportOptions:
    """The ``export`` section every recipe has; a recipe adds its own options as for :class:`PredictOptions`."""

    register: Optional[str] = None  # a name: the export becomes a new version of that MLflow registered model
    # the exported model's outputs must match the checkpoint's on real records within this (largest absolute
    # difference): float32 kernels of ONNX Runtime and PyTorch differ in summation order (~1e-6..1e-4 on logits);
    # a wrong weight, normalisation or graph is off by far more
    parity_tolerance: float = 1e-3
    parity_records: int = 4  # how many records of the eval (else train) split parity is checked on
    disclosure: DisclosureOptions = field(default_factory=DisclosureOptions)

    def check(self) -> None:
        check(self.register is None or (isinstance(self.register, str) and self.register.strip() != ""),
              "export.register", self.register, "null or a registered model name")
        check(self.parity_tolerance > 0, "export.parity_tolerance", self.parity_tolerance, "a number > 0")
        check(self.parity_records >= 1, "export.parity_records", self.parity_records, "an integer >= 1")


@dataclass
class RunConfig:
    """The sections every recipe shares. Recipes subclass this and add data/model/optim/loss."""

    recipe: RecipeSection = field(default_factory=RecipeSection)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    seed: int = 42
    ckpt_path: Optional[str] = None
    run_test: bool = True
    split: Optional[str] = None  # aift eval only
    format: Optional[str] = None  # aift export only
    export: ExportOptions = field(default_factory=ExportOptions)  # aift export only; a recipe may extend it
    input: Optional[str] = None  # aift predict only
    predict: PredictOptions = field(default_factory=PredictOptions)  # aift predict only; a recipe may extend it
    run: RunSection = field(default_factory=RunSection)  # run.purpose: checked against the cards' DUO codes
    audit: AuditConfig = field(default_factory=AuditConfig)  # where the audit log goes
    profile: ProfileConfig = field(default_factory=ProfileConfig)  # profile=secure: sensitive data (records/secure.py)



def build(node, **kwargs):
    """``hydra.utils.instantiate``, except that a user error raised while building (a bad pretrained folder, an
    unknown LoRA target) reaches the CLI as itself rather than wrapped in Hydra's InstantiationException."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from aifactory_train.errors import AiftError

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, AiftError):
            raise err.__cause__ from None
        raise


def compose_train_config(overrides: list[str], run_dir: Any):
    """The `aift train` config for ``overrides``, composed outside a Hydra app (launch, data deidentify), with
    ``paths.output_dir`` resolving to ``run_dir``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf import open_dict

    from aifactory_train.locations import config_dir, use_recipes

    extra = use_recipes()  # before Hydra starts: it reads the recipes' config folders when it is initialised
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose("train", overrides=[*extra, *overrides], return_hydra_config=True)
    except HydraException as err:
        raise ConfigError(str(err).strip().splitlines()[0]) from None
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def validate(cfg) -> Any:
    """Check the composed config against the recipe's schema; return the typed (dataclass) view.

    Raises ConfigError naming the key, the bad value and what would be valid.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, InterpolationResolutionError, ValidationError

    from aifactory_train.locations import load_object

    try:
        plain = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    except InterpolationResolutionError as err:
        raise ConfigError(f"config key '{getattr(err, 'full_key', '?')}': cannot be resolved: {_first_line(err)}") from None
    missing = [key for key, value in plain.items() if value == "???"]
    if missing:  # `???` in a root config: what the command cannot run without (aift predict: input)
        raise ConfigError(f"config key '{missing[0]}' is required and was not given; add {missing[0]}=... to the "
                          f"command")
    _check_model_task(plain)
    schema_path = plain.get("recipe", {}).get("schema")
    if not schema_path:
        raise ConfigError("config key 'recipe.schema' is missing; every recipe config must name its schema class")
    try:
        schema = load_object(schema_path)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"config key 'recipe.schema': cannot import '{schema_path}': {err}") from None
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), plain)
        typed = OmegaConf.to_object(merged)
    except ConfigKeyError as err:
        known = flat_keys(OmegaConf.to_container(OmegaConf.structured(schema)))
        raise ConfigError(unknown_key_message(str(err.full_key), known, f" (not in {schema.__name__})")) from None
    except ValidationError as err:
        raise ConfigError(f"config key '{err.full_key}': {_first_line(err)}{_expected_type(err)}") from None
    _check_tree(typed)
    _check_across_sections(typed)
    check_global_batch(typed)
    return typed


def _check_across_sections(typed) -> None:
    """Rules that tie keys of several sections together; each is a combination Lightning, torch or numpy refuses
    only once the job runs (or, worse, accepts and does something else)."""
    trainer, strategy = typed.trainer, typed.strategy
    low, high = SEED_RANGE
    check(low <= typed.seed <= high, "seed", typed.seed, f"an integer in [{low}, {high}] (numpy's seed range)")
    if strategy.name == "single":
        ranks = len(trainer.devices) if isinstance(trainer.devices, list) else trainer.devices
        check(ranks == "auto" or ranks == 1, "trainer.devices", trainer.devices,
              "1 (or auto): strategy=single runs one process on one device; for more devices use strategy=ddp "
              "(or fsdp, deepspeed_zero2, ...)")
        check(trainer.num_nodes == 1, "trainer.num_nodes", trainer.num_nodes,
              "1: strategy=single runs one process on one device; for several nodes use strategy=ddp (or fsdp, "
              "deepspeed_zero2, ...)")
    if strategy.name in GPU_STRATEGIES:
        check_choice("trainer.precision", trainer.precision, SHARDED_PRECISIONS)  # no 64-bit sharded training
    check(not (trainer.max_epochs == -1 and trainer.max_steps == -1 and typed.early_stopping.patience is None),
          "trainer.max_epochs", trainer.max_epochs,
          "an integer >= 1 when trainer.max_steps is -1 too: with neither limit (nor early_stopping.patience) the "
          "run never ends")
    if typed.early_stopping.patience is not None:
        check(trainer.limit_val_batches not in (0, 0.0), "early_stopping.patience", typed.early_stopping.patience,
              "null with trainer.limit_val_batches=0: early stopping watches a validation metric, and there is no "
              "validation")
    if _is_int(trainer.val_check_interval) and _is_int(trainer.limit_train_batches):
        check(trainer.val_check_interval <= trainer.limit_train_batches, "trainer.val_check_interval",
              trainer.val_check_interval,
              f"at most trainer.limit_train_batches ({trainer.limit_train_batches}) training batches, or a float "
              f"fraction of the epoch in (0, 1]")


def _gpu_driver_present() -> bool:
    """Whether this machine could have a GPU at all, without importing torch (seconds): NVIDIA's device files, WSL's
    GPU bridge or macOS (MPS). Where there is none, torch would see none either."""
    import glob
    import sys

    return sys.platform == "darwin" or bool(glob.glob("/dev/nvidia[0-9]*")) or os.path.exists("/dev/dxg")


def check_devices(typed, command: str = "train") -> None:
    """The trainer's accelerator, devices and precision against this machine, before anything is read or tracked
    (Lightning checks them only when the Trainer is built, after the data was read and the tracking run opened).

    Not part of :func:`validate`: `aift launch` validates on a login node for GPU nodes it does not have. torch is
    imported only where the answer needs it (a GPU accelerator or precision), so a CPU config stays fast."""
    from aifactory_train.errors import ConfigError

    trainer = typed.trainer
    accelerator, precision = trainer.accelerator, trainer.precision
    needs_gpu_answer = accelerator in ("gpu", "cuda", "mps") or (accelerator == "auto" and precision not in
                                                                  CPU_PRECISIONS)
    on_gpu = False
    if needs_gpu_answer and not _gpu_driver_present():
        if accelerator in ("gpu", "cuda", "mps"):
            raise ConfigError(f"config key 'trainer.accelerator': '{accelerator}' is not valid here: this machine has "
                              f"no GPU driver (no /dev/nvidia*); valid here: auto, cpu (or run on a GPU node: aift "
                              f"launch)")
    elif needs_gpu_answer:
        import torch

        if accelerator == "mps":
            if not torch.backends.mps.is_available():
                raise ConfigError("config key 'trainer.accelerator': 'mps' is not valid here: this machine has no "
                                  "Apple GPU (MPS); valid here: auto, cpu")
            check(precision != "64-true", "trainer.precision", precision, "not 64-true on MPS (no float64)")
            return
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if accelerator in ("gpu", "cuda") and count == 0:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            why = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
            raise ConfigError(f"config key 'trainer.accelerator': '{accelerator}' is not valid here: torch sees no "
                              f"CUDA GPU on this machine{why}; valid here: auto, cpu (or run on a GPU node: aift "
                              f"launch)")
        on_gpu = count > 0
        if on_gpu and command == "train":
            if _is_int(trainer.devices):
                check(trainer.devices <= count, "trainer.devices", trainer.devices,
                      f"at most {count}, the GPUs this machine has (or auto)")
            elif isinstance(trainer.devices, list):
                check(max(trainer.devices) < count, "trainer.devices", trainer.devices,
                      f"indices of this machine's GPUs, 0 to {count - 1}")
        if on_gpu and precision.startswith("bf16") and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"config key 'trainer.precision': '{precision}' is not valid here: this GPU "
                              f"({torch.cuda.get_device_name(0)}) has no bfloat16; valid: 16-mixed, 32-true, auto")
    if not on_gpu:
        # fp16 has no CPU kernels worth the name: Lightning turns 16-mixed into bf16-mixed behind the user's back,
        # and 16-true runs emulated half-precision math without loss scaling
        if precision not in CPU_PRECISIONS:
            raise ConfigError(f"config key 'trainer.precision': '{precision}' needs a CUDA GPU, and this run is on "
                              f"the CPU (trainer.accelerator={accelerator}); valid on CPU: {', '.join(CPU_PRECISIONS)}")


def gradient_accumulation(global_batch_size: int, batch_size: int, ranks: int) -> int:
    """How many batches of ``batch_size`` each of ``ranks`` ranks accumulates per optimizer step, so that a step
    sees ``global_batch_size`` samples. Not a whole number: a ConfigError that lists the global sizes and the
    per-device batch sizes that would fit."""
    per_round = batch_size * ranks
    if global_batch_size % per_round == 0:
        return global_batch_size // per_round
    lower, upper = global_batch_size // per_round * per_round, (global_batch_size // per_round + 1) * per_round
    valid = [f"trainer.global_batch_size={n}" for n in (lower, upper) if n > 0]
    if global_batch_size % ranks == 0:  # or keep the global batch and change the per-device one
        per_rank = global_batch_size // ranks
        sizes = sorted((d for d in range(1, per_rank + 1) if per_rank % d == 0), key=lambda d: abs(d - batch_size))
        valid += [f"data.batch_size={d}" for d in sorted(sizes[:3])]
    raise ConfigError(f"config key 'trainer.global_batch_size': {global_batch_size} is not a multiple of "
                      f"data.batch_size x ranks = {batch_size} x {ranks} = {per_round}, so no whole number of batches "
                      f"per rank adds up to it; valid: {', '.join(valid)}")


def require_checkpoint(cfg, command: str) -> None:
    """``ckpt_path`` for the commands that start from one (`???` in their root config does not override train.yaml's
    ``null``: OmegaConf keeps a value over a later ``???``), and a file (or DeepSpeed folder) that is there."""
    if cfg.ckpt_path in (None, "", "auto"):
        raise ConfigError(f"config key 'ckpt_path': {command} needs a checkpoint; give ckpt_path=FILE (a run's "
                          f"checkpoints/last.ckpt or best-*.ckpt)")
    from pathlib import Path

    from aifactory_train.errors import CheckpointError

    path = Path(str(cfg.ckpt_path))
    if cfg.ckpt_path != "last" and not path.exists():
        resolved = "" if path.is_absolute() else f" (resolved against the working folder {Path.cwd()})"
        raise CheckpointError(f"config key 'ckpt_path': checkpoint '{path}' does not exist{resolved}; give a "
                              f"checkpoint file, e.g. outputs/<recipe>/<run>/checkpoints/last.ckpt")


def check_global_batch(typed) -> None:
    """``trainer.global_batch_size`` against the recipe's per-device batch and, where the config fixes it, the rank
    count (else the check runs when the job has its ranks, before anything is tracked)."""
    global_batch_size = typed.trainer.global_batch_size
    if global_batch_size is None:
        return
    batch_size = getattr(getattr(typed, "data", None), "batch_size", None)
    check(isinstance(batch_size, int), "trainer.global_batch_size", global_batch_size,
          f"null: recipe {typed.recipe.name} has no data.batch_size to accumulate")
    ranks = typed.trainer.known_ranks(typed.strategy.name)
    if ranks is not None:
        gradient_accumulation(global_batch_size, batch_size, ranks)


def check_data(typed, stage: str = "fit", account: str | None = None, queued: bool = False) -> dict | None:
    """The quick half of the data checks, run before a job starts or is queued: the files the config points
    at for ``stage`` ("fit": training, "eval": ``aift eval``) are there (the recipe's ``DataConfig.check_files``:
    data root, split files, what the recipe requires of the data card), the data card is readable, and this use
    is inside the owner's usage terms (aifactory_train/records/usage_terms.py: recipe, user, node, Slurm account: the
    verified job's, or ``account``, the one a ``queued`` job will be charged to). A wrong ``data.root`` then fails
    in about a second, before Lightning is imported, a tracking store is opened or a Slurm job has waited in the queue.
    What the files hold (rows, boxes, classes) is checked by the DataModule when it reads them."""
    from aifactory_train.records.usage_terms import check_usage, data_paths

    data = getattr(typed, "data", None)
    check_files = getattr(data, "check_files", None)
    if check_files is not None:
        check_files(stage)
    # the owner's terms of every card at or above data.root, for the recipe whose code runs (returns the record)
    recipe = {"name": typed.recipe.name, "module": dict(typed.recipe.module)}
    if data is None:
        return None
    record = check_usage(data_paths(data), recipe, account, queued=queued, config=typed)
    from aifactory_train.records.secure import check_profile

    check_profile(typed, record)  # data that needs profile=secure; under it, the tracking store and sample logging
    return record


def missing_data_root(root: Any, recipe: str, deidentify: bool = False) -> Exception:
    """The error for a ``data.root`` that is not there. A relative one is resolved against the working folder, so
    the message names that folder and the synth hint writes to the same absolute path (run from anywhere, it
    makes the data this command looks for)."""
    from pathlib import Path

    from aifactory_train.errors import DataError

    root = Path(root)
    where = root if root.is_absolute() else Path.cwd() / root
    how = f"aift data synth {recipe} --out {where}"
    if deidentify:
        how += f", then aift data deidentify recipe={recipe} data.root={where} --out DIR"
    resolved = "" if root.is_absolute() else f" (a relative path, resolved against the working folder {Path.cwd()})"
    return DataError(f"data.root '{root}' does not exist{resolved}; give the folder of your data as data.root=DIR, "
                     f"or make demo data there with: {how}")


def _check_model_task(plain: dict) -> None:
    """A model config of another task (a detector for a classifier recipe) is named as such, before its keys
    fail the recipe's schema one by one."""
    model_task = (plain.get("model") or {}).get("task")
    recipe = plain.get("recipe") or {}
    if model_task is not None and model_task != recipe.get("task"):
        from aifactory_train.locations import model_configs_for_task

        valid = ", ".join("model=" + m for m in model_configs_for_task(recipe.get("task")))
        raise ConfigError(f"config key 'model': this is a {model_task} model, but recipe {recipe.get('name')} needs "
                          f"a {recipe.get('task')} model; valid: {valid}")


def flat_keys(node: Any, prefix: str = "") -> list[str]:
    """Every key path of a nested dict (``trainer.max_epochs``), sections included."""
    keys = []
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}{key}"
            keys.append(path)
            keys += flat_keys(value, path + ".")
    return keys


def unknown_key_message(key: str, known: list[str], where: str = "") -> str:
    """"unknown key 'trainer.max_epoch'; did you mean 'trainer.max_epochs'?" -- the closest key by spelling, else
    the keys of its section (a misspelt key is far more common than a missing feature)."""
    section = key.rpartition(".")[0]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    if not close:  # a close name in the same section (trainer.epochs -> trainer.max_epochs)
        siblings = [k for k in known if k.rpartition(".")[0] == section]
        leaf = key.rpartition(".")[2]
        names = difflib.get_close_matches(leaf, [k.rpartition(".")[2] for k in siblings], n=1, cutoff=0.6)
        close = [f"{section}.{names[0]}" if section else names[0]] if names else []
    if close:
        return f"unknown key '{key}'{where}; did you mean '{close[0]}'?"
    siblings = sorted(k for k in known if k.rpartition(".")[0] == section)
    if section and not siblings:
        return f"unknown key '{key}'{where}: there is no section '{section}'"
    shown = ", ".join(siblings[:25]) + (", ..." if len(siblings) > 25 else "")
    return f"unknown key '{key}'{where}; valid keys{f' in {section!r}' if section else ''}: {shown}"


_TYPE_WORDS = {"Integer": "an integer", "Float": "a number", "bool": "true or false", "str": "a string"}


def _expected_type(err: Exception) -> str:
    """OmegaConf says "Value 'ten' of type 'str' could not be converted to Integer": add what would be valid."""
    message = _first_line(err)
    for word, expected in _TYPE_WORDS.items():
        if message.endswith(f"converted to {word}") or f"not a valid {word}" in message:
            return f"; valid: {expected}"
    return ""


def _first_line(err: Exception) -> str:
    return str(getattr(err, "msg", err)).strip().splitlines()[0]


def _check_tree(node: Any) -> None:
    """Call ``check()`` (value rules beyond types) on every dataclass section, parents first."""
    if not is_dataclass(node):
        return
    if hasattr(node, "check"):
        node.check()
    for item in fields(node):
        _check_tree(getattr(node, item.name))



def composition_error(err: Exception, config_name: str, overrides: list[str]) -> Exception:
    """Hydra's refusal of the command line, as one line that says what would be valid: a misspelt key gets the
    closest real one (Hydra's own hint, to add it with `+`, would fail again at validation), an unknown group
    option the list of options. Anything that is not a composition error comes back as it is."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    if not isinstance(err, (ConfigCompositionException, MissingConfigException, OverrideParseException)):
        return err
    message = str(err).strip()
    found = re.match(r"Could not override '([^']+)'", message)
    if found:
        key = found.group(1)
        rest = [o for o in overrides if o.partition("=")[0].lstrip("~+") != key]
        return ConfigError(unknown_key_message(key, _composed_keys(config_name, rest)))
    found = re.search(r"Could not find '([^']+)/([^']+)'\s+Available options in '[^']+':\n((?:\t.*\n?)*)", message)
    if found:
        group, option, listed = found.groups()
        valid = ", ".join(f"{group}={name}" for name in listed.split())
        return ConfigError(f"config group '{group}': '{option}' is not an option; valid: {valid}")
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return ConfigError("; ".join(lines))


def _composed_keys(config_name: str, overrides: list[str]) -> list[str]:
    """Every key of the config ``overrides`` compose to (hydra.* included), for a spelling hint; [] if they do not
    compose either."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from aifactory_train.locations import config_dir

    overrides = [o for o in overrides if "=" in o and not o.startswith("-")]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
        return flat_keys(OmegaConf.to_container(cfg, resolve=False))
    except Exception:  # noqa: BLE001 - only a hint: another bad override, and there is none
        return []
    finally:
        GlobalHydra.instance().clear()
