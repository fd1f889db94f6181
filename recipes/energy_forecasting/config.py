"""The typed schema of energy_forecasting's config (see configs/recipe and configs/data).

Validated by `aift train` before any data is read; no torch or pandas import here, so it stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from aifactory_train.recipe import (ExportOptions, OptimConfig, PredictOptions, RunConfig, check, check_choice,
                                   missing_data_root)
from aifactory_train.recipe import DataError

GAP_POLICIES = ("interpolate", "mask", "drop_window")
DATA_EXTENSIONS = (".csv", ".parquet")


def check_data_files(root: str | Path, file: str) -> None:
    root = Path(root)
    if not root.is_dir():
        raise missing_data_root(root, "energy_forecasting")
    if not (root / file).is_file():
        raise DataError(f"config key 'data.file': '{root / file}' does not exist; expected a long-format CSV or Parquet "
                        f"file (series, timestamp, target, covariates) under data.root")


@dataclass
class ColumnsConfig:
    series: str = "series_id"
    timestamp: str = "timestamp"
    target: str = "value"


@dataclass
class SplitConfig:
    """Splits by time, never by row: training windows have all their targets before ``val_start``, validation
    targets lie in [val_start, test_start), the test backtest's targets from ``test_start`` on. Null starts: the
    last ``test_days`` are the test period and the ``val_days`` before them validation."""
    val_start: Optional[str] = None
    test_start: Optional[str] = None
    val_days: int = 14
    test_days: int = 14

    def check(self) -> None:
        check(self.val_days >= 1, "data.split.val_days", self.val_days, "an integer >= 1")
        check(self.test_days >= 1, "data.split.test_days", self.test_days, "an integer >= 1")
        if (self.val_start is None) != (self.test_start is None):
            check(False, "data.split", {"val_start": self.val_start, "test_start": self.test_start},
                  "both val_start and test_start set (ISO timestamps with a zone), or both null")
        if self.val_start is not None:  # checked here too, so a wrong split fails before a job is queued
            from datetime import datetime

            stamps = {}
            for key in ("val_start", "test_start"):
                value = getattr(self, key)
                try:
                    stamps[key] = datetime.fromisoformat(str(value))
                except ValueError:
                    stamps[key] = None
                check(stamps[key] is not None and stamps[key].tzinfo is not None, f"data.split.{key}", value,
                      "an ISO 8601 timestamp with a zone, e.g. 2026-10-01T00:00:00+02:00")
            check(stamps["test_start"] > stamps["val_start"], "data.split.test_start", self.test_start,
                  f"a time after data.split.val_start ({self.val_start}); otherwise test windows would overlap "
                  f"training windows")


@dataclass
class DataConfig:
    _target_: str = f"{__package__}.data.EnergyDataModule"  # this package's, also in a copy
    root: str = "data/energy_forecasting"
    file: str = "energy.csv"                 # long format, .csv or .parquet, relative to root
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    known_covariates: List[str] = field(default_factory=list)     # known for the forecast horizon in advance
    observed_covariates: List[str] = field(default_factory=list)  # known only up to the forecast origin
    frequency: str = "1h"
    timezone: str = "Europe/Amsterdam"       # the local time the calendar features are computed in
    require_timezone: bool = True            # timestamps must carry an offset; false: naive ones are local time
    history: int = 168                       # input steps (one week of hours)
    horizon: int = 24                        # forecast steps
    gap_policy: str = "interpolate"          # interpolate | mask | drop_window
    max_interpolate: int = 3                 # interpolate: longer gaps are left missing and their windows dropped
    meter_reset_below: Optional[float] = 0.0  # a target below this is a meter reset: treated as a gap (null: off)
    train_stride: int = 1                    # steps between training window origins (the recipe config: 2)
    eval_stride: int = 24                    # steps between origins of the val/test rolling-origin backtest
    split: SplitConfig = field(default_factory=SplitConfig)
    batch_size: int = 256
    num_workers: int = 0

    def check(self) -> None:
        check(Path(self.file).suffix.lower() in DATA_EXTENSIONS, "data.file", self.file, "a .csv or .parquet file")
        check_choice("data.gap_policy", self.gap_policy, GAP_POLICIES)
        check(self.history >= 2, "data.history", self.history, "an integer >= 2")
        check(self.horizon >= 1, "data.horizon", self.horizon, "an integer >= 1")
        check(self.max_interpolate >= 1, "data.max_interpolate", self.max_interpolate, "an integer >= 1")
        check(self.train_stride >= 1, "data.train_stride", self.train_stride, "an integer >= 1")
        check(self.eval_stride >= 1, "data.eval_stride", self.eval_stride, "an integer >= 1")
        check(self.batch_size >= 1, "data.batch_size", self.batch_size, "an integer >= 1")
        check(self.num_workers >= 0, "data.num_workers", self.num_workers, "an integer >= 0")
        both = set(self.known_covariates) & set(self.observed_covariates)
        check(not both, "data.observed_covariates", self.observed_covariates,
              f"no column also in data.known_covariates ({', '.join(sorted(both))})")
        names = [self.columns.series, self.columns.timestamp, self.columns.target]
        clash = set(names) & set(self.known_covariates + self.observed_covariates)
        check(not clash, "data.known_covariates", self.known_covariates,
              f"covariates other than the series, timestamp and target columns ({', '.join(sorted(clash))})")
        self.split.check()

    def check_files(self, stage: str = "fit") -> None:
        check_data_files(self.root, self.file)


@dataclass
class ModelConfig:
    task: str = "forecasting"
    name: str = "tide_mlp"
    hidden: int = 128
    layers: int = 2
    dropout: float = 0.0
    pool: List[int] = field(default_factory=lambda: [1, 4, 24])  # N-HiTS-style multi-rate views of the history

    def check(self) -> None:
        check_choice("model.name", self.name, ("tide_mlp",))
        check(self.hidden >= 4, "model.hidden", self.hidden, "an integer >= 4")
        check(self.layers >= 1, "model.layers", self.layers, "an integer >= 1")
        check(0 <= self.dropout < 1, "model.dropout", self.dropout, "a number in [0, 1)")
        check(len(self.pool) >= 1 and all(isinstance(p, int) and p >= 1 for p in self.pool), "model.pool", self.pool,
              "a list of pooling sizes >= 1, e.g. [1, 4, 24]")


@dataclass
class LossConfig:
    quantiles: List[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])

    def check(self) -> None:
        q = self.quantiles
        ok = len(q) >= 1 and all(0 < v < 1 for v in q) and list(q) == sorted(set(q)) and 0.5 in q
        check(ok, "loss.quantiles", q, "increasing quantiles in (0, 1) that include 0.5 (the point forecast)")


@dataclass
class BatteryConfig:
    capacity_kwh: float = 10.0
    power_kw: float = 3.0
    initial_kwh: float = 0.0
    efficiency: float = 0.95  # round trip

    def check(self) -> None:
        check(self.capacity_kwh > 0, "predict.battery.capacity_kwh", self.capacity_kwh, "a number > 0")
        check(self.power_kw > 0, "predict.battery.power_kw", self.power_kw, "a number > 0")
        check(0 <= self.initial_kwh <= self.capacity_kwh, "predict.battery.initial_kwh", self.initial_kwh,
              f"a number in [0, predict.battery.capacity_kwh = {self.capacity_kwh}]")
        check(0 < self.efficiency <= 1, "predict.battery.efficiency", self.efficiency, "a number in (0, 1]")


@dataclass
class EnergyPredictOptions(PredictOptions):
    output_format: str = "csv"      # forecasts.<ext> (and battery_plan.<ext>) in the output folder
    plan_charging: bool = False     # a battery schedule per household from the load, PV and price forecasts
    battery: BatteryConfig = field(default_factory=BatteryConfig)
    load_suffix: str = ":load"      # series <household><suffix>: which forecasts belong to one household
    pv_suffix: str = ":pv"
    price_column: str = "price"     # the known covariate with the day-ahead price

    def check(self) -> None:
        super().check()
        check_choice("predict.output_format", self.output_format, ("csv", "parquet"))
        self.battery.check()


@dataclass
class EnergyExportOptions(ExportOptions):
    opset: int = 17

    def check(self) -> None:
        super().check()
        check(13 <= self.opset <= 21, "export.opset", self.opset, "an ONNX opset from 13 to 21")


@dataclass
class EnergyForecastingConfig(RunConfig):
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    predict: EnergyPredictOptions = field(default_factory=EnergyPredictOptions)
    export: EnergyExportOptions = field(default_factory=EnergyExportOptions)
