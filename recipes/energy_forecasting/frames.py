"""Long-format tables to forecasting windows: reading and checking, UTC and local time, gaps, scaling, windows.

Pure pandas/numpy (no torch), shared by training (data.py), prediction (predict.py) and the tests.

- Timestamps are normalised to UTC; the step grid is regular in UTC, so Dutch daylight-saving days are simply 23
  or 25 steps of local time. Calendar features (hour, weekday) are computed in ``data.timezone`` local time.
- Observed-only covariates enter the history block only; known-in-advance covariates (and the calendar) also the
  future block. The network has no input through which an observed covariate after the origin could reach it.
- Scaling: per series (target mean and standard deviation) and per covariate, fitted on the rows before
  ``val_start`` only, and kept in the checkpoint (``data_info``) for predict and export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from aifactory_train.recipe import ConfigError, DataError

ZONE = r"(?:Z|z|[+-]\d{2}(?::?\d{2})?)$"
CALENDAR = ("hour_sin", "hour_cos", "weekday_sin", "weekday_cos", "weekend")


def _where(path: Path, index: int) -> str:
    """A data row as a person finds it: a CSV's line number (header = line 1), a Parquet file's row index."""
    return f"'{path}' line {index + 2}" if path.suffix.lower() == ".csv" else f"'{path}' row {index}"


def read_table(path: str | Path, columns: dict[str, str], covariates: list[str], require_timezone: bool,
               timezone: str, target_required: bool = True) -> pd.DataFrame:
    """The table with columns ``series`` (str), ``timestamp`` (UTC), ``target`` (float, NaN = missing) and the
    covariates (float), in file order, every problem named by file, row and column."""
    path = Path(path)
    names = {"series": columns["series"], "timestamp": columns["timestamp"], "target": columns["target"]}
    try:
        if path.suffix.lower() == ".parquet":
            raw = pd.read_parquet(path)
        else:
            raw = pd.read_csv(path, dtype={names["series"]: str, names["timestamp"]: str}, keep_default_na=True)
    except Exception as err:  # noqa: BLE001 - whatever the reader raised, named with the file
        raise DataError(f"cannot read '{path}': {str(err).splitlines()[0]}") from None
    wanted = [names["series"], names["timestamp"], *([names["target"]] if target_required else []), *covariates]
    missing = [c for c in wanted if c not in raw.columns]
    if missing:
        key = {names["series"]: "data.columns.series", names["timestamp"]: "data.columns.timestamp",
               names["target"]: "data.columns.target"}.get(missing[0], "data.known_covariates/observed_covariates")
        raise DataError(f"'{path}': no column '{missing[0]}' ({key}); the file has: {', '.join(map(str, raw.columns))}")
    raw = raw.reset_index(drop=True)
    out = pd.DataFrame({"series": raw[names["series"]].astype(str)})
    out["timestamp"] = parse_timestamps(raw[names["timestamp"]], path, names["timestamp"], require_timezone, timezone)
    target = raw[names["target"]] if names["target"] in raw.columns else pd.Series(np.nan, index=raw.index)
    out["target"] = numeric(target, path, names["target"])
    for name in covariates:
        out[name] = numeric(raw[name], path, name)
    dup = out.duplicated(["series", "timestamp"], keep=False)
    if dup.any():
        rows = np.flatnonzero(dup.to_numpy())
        first = rows[0]
        twin = next(r for r in rows[1:] if out.at[r, "series"] == out.at[first, "series"]
                    and out.at[r, "timestamp"] == out.at[first, "timestamp"])
        raise DataError(f"{_where(path, first)} and {_where(path, twin).split(' ', 1)[1]}: duplicate rows for series "
                        f"'{out.at[first, 'series']}' at {out.at[first, 'timestamp'].isoformat()} (columns "
                        f"'{names['series']}', '{names['timestamp']}'); expected one row per series and timestamp")
    return out


def parse_timestamps(values: pd.Series, path: Path, column: str, require_timezone: bool, timezone: str) -> pd.Series:
    if isinstance(values.dtype, pd.DatetimeTZDtype):
        return values.dt.tz_convert("UTC").dt.as_unit("ns")
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        if require_timezone:
            raise DataError(f"{_where(path, 0)} column '{column}': timestamps without a time zone "
                            f"({values.iloc[0]}); data.require_timezone=true expects zone-aware timestamps (UTC or "
                            f"with an offset), or set data.require_timezone=false to read them as {timezone} time")
        return _localise(values, path, column, timezone).dt.as_unit("ns")
    text = values.astype("string").str.strip()
    empty = text.isna() | (text == "")
    if empty.any():
        row = int(np.flatnonzero(empty.to_numpy())[0])
        raise DataError(f"{_where(path, row)} column '{column}': empty timestamp; expected e.g. 2026-03-29T02:00:00+02:00")
    zoned = text.str.contains(ZONE, regex=True)
    if require_timezone and not zoned.all():
        row = int(np.flatnonzero(~zoned.to_numpy())[0])
        raise DataError(f"{_where(path, row)} column '{column}': timestamp '{text.iloc[row]}' has no time zone; "
                        f"data.require_timezone=true expects an offset (e.g. +01:00 or Z), or set "
                        f"data.require_timezone=false to read naive timestamps as {timezone} time")
    parsed = pd.Series(pd.NaT, index=values.index, dtype="datetime64[ns, UTC]")
    if zoned.any():
        parsed[zoned] = pd.to_datetime(text[zoned], utc=True, format="ISO8601", errors="coerce")
    if (~zoned).any():
        naive = pd.to_datetime(text[~zoned], format="ISO8601", errors="coerce")
        parsed[~zoned] = _localise(naive, path, column, timezone)
    bad = parsed.isna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{_where(path, row)} column '{column}': '{text.iloc[row]}' is not a timestamp; expected ISO "
                        f"8601 with an offset, e.g. 2026-10-25T02:00:00+01:00")
    return parsed


def _localise(naive: pd.Series, path: Path, column: str, timezone: str) -> pd.Series:
    local = naive.dt.tz_localize(timezone, ambiguous="NaT", nonexistent="NaT")
    bad = local.isna() & naive.notna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{_where(path, row)} column '{column}': local time {naive.iloc[row]} is ambiguous or does not "
                        f"exist in {timezone} (a daylight-saving change); give timestamps with an offset")
    return local.dt.tz_convert("UTC")


def numeric(values: pd.Series, path: Path, column: str) -> pd.Series:
    """Floats; an empty cell is a gap (NaN), anything else that is no number is an error naming its row."""
    if pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values.dtype):
        return values.astype("float64")
    converted = pd.to_numeric(values, errors="coerce")
    text = values.astype("string").str.strip()
    bad = converted.isna() & text.notna() & (text != "") & ~text.str.lower().isin(["nan", "na", "null"])
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{_where(path, row)} column '{column}': {text.iloc[row]!r} is not a number; expected a "
                        f"number, or an empty cell for a missing value")
    return converted.astype("float64")


# -- per series: the regular grid, gaps, features -----------------------------------------------------------------

@dataclass
class GapCounts:
    missing_steps: int = 0       # grid steps without a row or with an empty target
    meter_resets: int = 0        # targets below data.meter_reset_below, treated as missing
    interpolated: int = 0        # target steps filled by data.gap_policy=interpolate
    covariates_filled: int = 0   # covariate values filled (linear, then nearest at the ends)
    windows_dropped: dict[str, int] = field(default_factory=dict)  # per split: windows with a missing value

    def as_dict(self) -> dict[str, Any]:
        return {"missing_steps": self.missing_steps, "meter_resets": self.meter_resets,
                "interpolated": self.interpolated, "covariates_filled": self.covariates_filled,
                "windows_dropped": dict(self.windows_dropped)}


@dataclass
class Series:
    name: str
    times: pd.DatetimeIndex      # UTC, regular
    target: np.ndarray           # float64, NaN where missing after the gap policy
    observed: np.ndarray         # bool: a real measurement (not filled, not a gap)
    known: np.ndarray            # (T, K) float64, filled
    obs: np.ndarray              # (T, O) float64, filled
    calendar: np.ndarray         # (T, C) local-time features
    baselines: np.ndarray        # (T, 2): seasonal naive, same local time yesterday / last week (raw units)


def fill_runs(values: np.ndarray, longest: int | None) -> tuple[np.ndarray, int]:
    """Linear interpolation of NaN runs inside the series of at most ``longest`` steps (None: every inside run;
    then nearest values at the ends). Returns the values and how many were filled."""
    values = values.astype("float64", copy=True)
    missing = np.isnan(values)
    if not missing.any() or missing.all():
        return values, 0
    index = np.arange(len(values))
    filled = np.interp(index, index[~missing], values[~missing])
    if longest is None:
        values[missing] = filled[missing]
        return values, int(missing.sum())
    starts = np.flatnonzero(missing & ~np.r_[False, missing[:-1]])
    ends = np.flatnonzero(missing & ~np.r_[missing[1:], False])
    count = 0
    for start, end in zip(starts, ends):
        if start > 0 and end < len(values) - 1 and end - start + 1 <= longest:
            values[start:end + 1] = filled[start:end + 1]
            count += int(end - start + 1)
    return values, count


def fill_forward(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Causal filling for observed-only covariates: the last value known at each step (the first known one before
    it). Interpolating would pull a value from after a forecast origin into the history."""
    series = pd.Series(values, dtype="float64")
    missing = int(series.isna().sum())
    return series.ffill().bfill().fillna(0.0).to_numpy(), missing if missing < len(series) else 0


def calendar_features(times: pd.DatetimeIndex, timezone: str) -> np.ndarray:
    local = times.tz_convert(timezone)
    hour = (local.hour + local.minute / 60.0).to_numpy(dtype="float64")
    weekday = local.day_of_week.to_numpy(dtype="float64")
    return np.stack([np.sin(2 * np.pi * hour / 24), np.cos(2 * np.pi * hour / 24), np.sin(2 * np.pi * weekday / 7),
                     np.cos(2 * np.pi * weekday / 7), (weekday >= 5).astype("float64")], axis=1)


def seasonal_naive(times: pd.DatetimeIndex, values: np.ndarray, timezone: str, days: int, step: pd.Timedelta) -> np.ndarray:
    """The value at the same local wall-clock time ``days`` earlier (after a 25-hour day that is 25 hourly steps
    back, after a 23-hour day 23); where that local time did not exist or has no value, ``days`` x 24 h back."""
    local = times.tz_convert(timezone).tz_localize(None)
    by_local = pd.Series(values, index=local)
    by_local = by_local[~by_local.index.duplicated(keep="first")]
    wanted = local - pd.Timedelta(days=days)
    out = by_local.reindex(wanted).to_numpy()
    fallback = pd.Series(values, index=times).reindex(times - pd.Timedelta(days=days)).to_numpy()
    return np.where(np.isnan(out), fallback, out)


def build_series(frame: pd.DataFrame, known: list[str], observed: list[str], frequency: str, timezone: str,
                 gap_policy: str, max_interpolate: int, meter_reset_below: float | None, counts: GapCounts,
                 path: Path, end: pd.Timestamp | None = None) -> dict[str, Series]:
    """One regular UTC grid per series (from its first to its last row, or to ``end``), gaps per policy."""
    step = pd.Timedelta(frequency)
    out = {}
    for name, rows in frame.groupby("series", sort=True):
        rows = rows.sort_values("timestamp")
        start = rows["timestamp"].iloc[0]
        off = ((rows["timestamp"] - start) % step) != pd.Timedelta(0)
        if off.any():
            row = int(rows.index[np.flatnonzero(off.to_numpy())[0]])
            raise DataError(f"{_where(path, row)}: series '{name}' timestamp {rows.at[row, 'timestamp'].isoformat()} "
                            f"is off the data.frequency={frequency} grid that starts at {start.isoformat()}")
        times = pd.date_range(start, end if end is not None else rows["timestamp"].iloc[-1], freq=step)
        grid = rows.set_index("timestamp").reindex(times)
        target = grid["target"].to_numpy(dtype="float64")
        counts.missing_steps += int(np.isnan(target).sum())
        if meter_reset_below is not None:
            reset = target < meter_reset_below
            counts.meter_resets += int(reset.sum())
            target = np.where(reset, np.nan, target)
        observed_mask = ~np.isnan(target)
        if gap_policy == "interpolate":
            target, n = fill_runs(target, max_interpolate)
            counts.interpolated += n
        covs = []
        for columns, fill in ((known, lambda v: fill_runs(v, None)), (observed, fill_forward)):
            block = np.zeros((len(times), len(columns)))
            for j, column in enumerate(columns):
                block[:, j], n = fill(grid[column].to_numpy(dtype="float64"))
                counts.covariates_filled += n
            covs.append(block)
        raw_for_baseline = np.where(observed_mask, target, np.nan)
        baselines = np.stack([seasonal_naive(times, raw_for_baseline, timezone, d, step) for d in (1, 7)], axis=1)
        out[str(name)] = Series(str(name), times, target, observed_mask, covs[0], covs[1],
                                calendar_features(times, timezone), baselines)
    return out


# -- splits and scaling --------------------------------------------------------------------------------------------

def _aware(value: str, key: str) -> pd.Timestamp:
    try:
        stamp = pd.Timestamp(value)
    except ValueError:
        raise ConfigError(f"config key '{key}': {value!r} is not a timestamp; expected ISO 8601 with an offset") from None
    if stamp.tzinfo is None:
        raise ConfigError(f"config key '{key}': {value!r} has no time zone; expected e.g. 2026-10-01T00:00:00+02:00")
    return stamp.tz_convert("UTC")


def split_starts(split: dict[str, Any], first: pd.Timestamp, last: pd.Timestamp, timezone: str, history: int,
                 horizon: int, step: pd.Timedelta) -> tuple[pd.Timestamp, pd.Timestamp]:
    """(val_start, test_start) in UTC; by default local midnights ``test_days`` and ``val_days`` before the end."""
    if split.get("val_start") is not None:
        val_start = _aware(split["val_start"], "data.split.val_start")
        test_start = _aware(split["test_start"], "data.split.test_start")
    else:
        end_day = (last - step * (horizon - 1)).tz_convert(timezone).normalize()
        test_start = (end_day - pd.DateOffset(days=int(split["test_days"]) - 1)).tz_convert("UTC")
        val_start = (test_start.tz_convert(timezone) - pd.DateOffset(days=int(split["val_days"]))).tz_convert("UTC")
    if test_start <= val_start:
        raise ConfigError(f"config key 'data.split.test_start': {test_start.isoformat()} is not after data.split."
                          f"val_start {val_start.isoformat()}: test windows would overlap training and validation "
                          f"windows; valid: a test_start after val_start")
    if val_start < first + step * (history + horizon - 1):
        raise ConfigError(f"config key 'data.split.val_start': {val_start.isoformat()} leaves no training window: "
                          f"the data start at {first.isoformat()} and a window needs data.history + data.horizon = "
                          f"{history + horizon} steps before it; valid: a later val_start or fewer data.split days")
    if test_start > last - step * (horizon - 1):
        raise ConfigError(f"config key 'data.split.test_start': {test_start.isoformat()} leaves no full test window "
                          f"before the data end at {last.isoformat()}")
    return val_start, test_start


def fit_scaling(series: dict[str, Series], val_start: pd.Timestamp, known: list[str], observed: list[str]) -> dict:
    """Target mean/std per series and mean/std per covariate, from the rows before ``val_start`` only."""
    targets, covs = {}, {}
    blocks = []
    for s in series.values():
        train = s.times < val_start
        values = s.target[train & s.observed]
        if len(values) < 2:
            raise DataError(f"series '{s.name}' has {len(values)} measured value(s) before val_start "
                            f"{val_start.isoformat()}; its scaling is fitted on training data only and needs some")
        targets[s.name] = [float(values.mean()), float(max(values.std(), 1e-3))]
        blocks.append(np.concatenate([s.known[train], s.obs[train]], axis=1))
    stacked = np.concatenate(blocks)
    for j, column in enumerate([*known, *observed]):
        covs[column] = [float(stacked[:, j].mean()), float(max(stacked[:, j].std(), 1e-6))]
    return {"target": targets, "covariates": covs}


# -- windows ----------------------------------------------------------------------------------------------------

class Bank:
    """Every series' scaled arrays, concatenated (origins index into them): what the Dataset slices."""

    def __init__(self, series: dict[str, Series], scaling: dict, known: list[str], observed: list[str]):
        self.names = list(series)
        self.offsets = np.cumsum([0] + [len(s.times) for s in series.values()])
        cat = lambda f: np.concatenate([f(s) for s in series.values()])  # noqa: E731
        self.loc = cat(lambda s: np.full(len(s.times), scaling["target"][s.name][0]))
        self.scale = cat(lambda s: np.full(len(s.times), scaling["target"][s.name][1]))
        raw = cat(lambda s: s.target)
        self.present = ~np.isnan(raw)                          # a value the model may see (measured or filled)
        self.observed = cat(lambda s: s.observed)              # a measured value (scored)
        self.raw = raw
        self.y = np.where(self.present, (np.nan_to_num(raw) - self.loc) / self.scale, 0.0).astype("float32")
        cov = lambda block, names: (block - np.array([scaling["covariates"][c][0] for c in names])) / np.array(  # noqa: E731
            [scaling["covariates"][c][1] for c in names]) if names else block
        self.known = cat(lambda s: cov(s.known, known)).astype("float32")
        self.obs = cat(lambda s: cov(s.obs, observed)).astype("float32")
        self.calendar = cat(lambda s: s.calendar).astype("float32")
        self.baselines = cat(lambda s: s.baselines)
        self.times = np.concatenate([s.times.asi8 for s in series.values()])

        # the per-step input rows, built once; a window is a slice of them
        self.past_rows = np.concatenate([self.y[:, None], self.present[:, None].astype("float32"), self.obs,
                                         self.known, self.calendar], axis=1)
        self.future_rows = np.concatenate([self.known, self.calendar], axis=1)

    def past(self, origin: int, history: int) -> np.ndarray:
        """(history, 2 + O + K + C): scaled target, present flag, observed covariates, known covariates, calendar,
        for the steps up to and including ``origin``."""
        return self.past_rows[origin - history + 1:origin + 1]

    def future(self, origin: int, horizon: int) -> np.ndarray:
        """(horizon, K + C): only what is known in advance, for the steps after ``origin``."""
        return self.future_rows[origin + 1:origin + horizon + 1]


def window_origins(bank: Bank, series_index: int, history: int, horizon: int, hi: pd.Timestamp | None, stride: int, first_target_from: pd.Timestamp | None,
                   gap_policy: str) -> tuple[list[int], int]:
    """Global origin indices of one series whose targets lie in [first_target_from, hi) (all of them), every
    ``stride`` steps, and how many were dropped for a missing value (``mask``: only if no target is measured)."""
    start, stop = bank.offsets[series_index], bank.offsets[series_index + 1]
    times = bank.times[start:stop]
    first = history - 1
    if first_target_from is not None:
        first = max(first, int(np.searchsorted(times, first_target_from.value)) - 1)
    origins, dropped = [], 0
    for local in range(first, stop - start - horizon, stride):
        if hi is not None and times[local + horizon] >= hi.value:
            break
        g = start + local
        if bank.present[g] and not bank.observed[g]:
            ok = False  # the origin itself was interpolated, from a value after it: that would be look-ahead
        elif gap_policy == "mask":
            ok = bank.observed[g + 1:g + horizon + 1].any()
        else:
            ok = bank.present[g - history + 1:g + horizon + 1].all()
        if ok:
            origins.append(g)
        else:
            dropped += 1
    return origins, dropped
