"""`aift predict` for energy_forecasting: the next ``horizon`` steps' quantiles per series, and optionally a battery
schedule per household.

Each input file is a long-format table like the training data: per series its history (the target measured up to
the forecast origin, the last step with a measured target) and rows for the ``horizon`` steps after it that carry
the known-in-advance covariates (their target cells empty). Observed-only covariates are read up to the origin
only; whatever the future rows hold for them is never used. Scaling is the checkpoint's (fitted on the training
rows). Results: one JSON line per series (predictions.jsonl) and ``forecasts.csv`` (or .parquet), one row per
series and step.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch

from aifactory_train.recipe import ConfigError, DataError
from .frames import Bank, GapCounts, build_series, read_table

def read_options(options: dict[str, Any]) -> dict[str, Any]:
    """The predict options (validated by the schema, config.py: EnergyPredictOptions), with its defaults for a
    caller that passes fewer."""
    battery = {"capacity_kwh": 10.0, "power_kw": 3.0, "initial_kwh": 0.0, "efficiency": 0.95,
               **dict(options.get("battery") or {})}
    return {"output_format": options.get("output_format", "csv"), "plan_charging": bool(options.get("plan_charging")),
            "battery": battery, "load_suffix": options.get("load_suffix", ":load"),
            "pv_suffix": options.get("pv_suffix", ":pv"), "price_column": options.get("price_column", "price")}


def forecast_inputs(frame: pd.DataFrame, info: dict[str, Any], path: Path) -> tuple[Bank, list[int], dict]:
    """The Bank of every series cut at its origin (+ horizon known steps), the origins, and the raw future known
    covariates per series (for the battery plan)."""
    known, observed = list(info["known_covariates"]), list(info["observed_covariates"])
    history, horizon = int(info["history"]), int(info["horizon"])
    step = pd.Timedelta(info["frequency"])
    series, futures = {}, {}
    for name, rows in frame.groupby("series", sort=True):
        name = str(name)
        if name not in info["scaling"]["target"]:
            raise DataError(f"'{path}': series '{name}' was not in the training data, so it has no scaling (fitted on "
                            f"training rows only); known series: {', '.join(list(info['scaling']['target'])[:5])}, ...")
        measured = rows["target"].notna()
        reset = info.get("meter_reset_below")
        if reset is not None:
            measured &= ~(rows["target"] < reset)
        if not measured.any():
            raise DataError(f"'{path}': series '{name}' has no measured target value, so no forecast origin")
        origin = rows.loc[measured, "timestamp"].max()
        start = origin - step * (history - 1)
        if rows["timestamp"].min() > start:
            raise DataError(f"'{path}': series '{name}' has history from {rows['timestamp'].min().isoformat()} to "
                            f"{origin.isoformat()}, shorter than data.history = {history} steps (from {start.isoformat()})")
        wanted = pd.date_range(origin + step, periods=horizon, freq=step)
        ahead = rows.set_index("timestamp").reindex(wanted)
        for column in known:
            empty = ahead[column].isna().to_numpy()
            if empty.any():
                raise DataError(f"'{path}' column '{column}': series '{name}' has no value at "
                                f"{wanted[int(np.flatnonzero(empty)[0])].isoformat()}; '{column}' is declared known in "
                                f"advance (data.known_covariates), so the future rows must carry it for all {horizon} "
                                f"steps after the last measured value ({origin.isoformat()})")
        futures[name] = ahead
        cut = rows[(rows["timestamp"] >= start) & (rows["timestamp"] <= origin + step * horizon)].copy()
        cut.loc[cut["timestamp"] > origin, ["target", *observed]] = np.nan  # nothing after the origin but known ones
        built = build_series(cut, known, observed, info["frequency"], info["timezone"], info["gap_policy"],
                             int(info["max_interpolate"]), reset, GapCounts(), path, end=origin + step * horizon)
        series[name] = built[name]
    bank = Bank(series, info["scaling"], known, observed)
    origins = [int(bank.offsets[i] + history - 1) for i in range(len(series))]
    return bank, origins, futures


def forecast(module, bank: Bank, origins: list[int], batch_size: int) -> np.ndarray:
    """(series, horizon, quantiles) in the target's units."""
    info = module.hparams.data_info
    history, horizon = int(info["history"]), int(info["horizon"])
    out = []
    for start in range(0, len(origins), batch_size):
        chunk = origins[start:start + batch_size]
        past = torch.from_numpy(np.stack([bank.past(o, history) for o in chunk])).to(module.device)
        future = torch.from_numpy(np.stack([bank.future(o, horizon) for o in chunk])).to(module.device)
        pred = module.net(past, future).float().cpu().numpy()
        loc, scale = bank.loc[chunk][:, None, None], bank.scale[chunk][:, None, None]
        out.append(pred * scale + loc)
    return np.concatenate(out)


def plan_battery(load: np.ndarray, pv: np.ndarray, price: np.ndarray, capacity_kwh: float, power_kw: float,
                 initial_kwh: float = 0.0, efficiency: float = 1.0, step_hours: float = 1.0) -> pd.DataFrame:
    """A charge/discharge schedule from forecasts of load and PV (kWh per step) and prices, greedy and documented:

    1. Solar surplus first: whenever PV exceeds load, the surplus charges the battery (up to its power and room).
    2. Grid charging in the cheapest hours only: the ``ceil(room / (power x step))`` cheapest steps, and only up
       to the room the forecast solar surplus still to come will not fill.
    3. Discharge to cover the load PV does not, in steps whose price beats the dearest grid-charging price divided
       by the round-trip efficiency (otherwise storing did not pay).

    Never above ``capacity_kwh`` or below 0, never more than ``power_kw`` in or out, never both in one step.
    Losses: sqrt(efficiency) on the way in and on the way out."""
    n = len(load)
    limit = power_kw * step_hours
    eta = math.sqrt(efficiency)
    surplus = np.clip(pv - load, 0, None)
    deficit = np.clip(load - pv, 0, None)
    steps_to_fill = max(1, math.ceil((capacity_kwh - initial_kwh) / limit)) if capacity_kwh > initial_kwh else 0
    cheapest = set(np.argsort(price, kind="stable")[:steps_to_fill].tolist()) if steps_to_fill else set()
    charge_price = max((price[i] for i in cheapest), default=-math.inf)
    soc = initial_kwh
    rows = []
    for t in range(n):
        solar = grid = discharge = 0.0
        if surplus[t] > 0:
            solar = min(surplus[t], limit, (capacity_kwh - soc) / eta)
            soc += solar * eta
        elif t in cheapest:
            coming = min(float(np.minimum(surplus[t + 1:], limit).sum()) * eta, capacity_kwh)
            grid = max(0.0, min(limit, (capacity_kwh - coming - soc) / eta))
            soc += grid * eta
        elif deficit[t] > 0 and price[t] * efficiency > charge_price:
            discharge = min(deficit[t], limit, soc * eta)
            soc -= discharge / eta
        soc = min(max(soc, 0.0), capacity_kwh)  # rounding only
        rows.append({"step": t + 1, "load_kwh": float(load[t]), "pv_kwh": float(pv[t]), "price": float(price[t]),
                     "solar_charge_kw": solar / step_hours, "grid_charge_kw": grid / step_hours,
                     "discharge_kw": discharge / step_hours, "soc_kwh": soc})
    return pd.DataFrame(rows)


def _write(table: pd.DataFrame, path: Path, fmt: str) -> Path:
    path = path.with_suffix(f".{fmt}")
    if fmt == "csv":
        table.to_csv(path, index=False)
    else:
        table.to_parquet(path, index=False)
    return path


def predict_files(module, files: list[Path], batch_size: int, options: dict[str, Any]) -> Iterator[dict]:
    info = module.hparams.data_info
    opts = read_options(options)
    quantiles = [float(q) for q in module.hparams.loss["quantiles"]]
    tz = info["timezone"]
    tables, plans = [], []
    for path in files:
        frame = read_table(path, info["columns"], [*info["known_covariates"], *info["observed_covariates"]],
                           bool(info["require_timezone"]), tz)
        bank, origins, futures = forecast_inputs(frame, info, path)
        pred = forecast(module, bank, origins, batch_size)
        for i, name in enumerate(bank.names):
            times = futures[name].index
            row = {"file": str(path), "series_id": name, "origin": pd.Timestamp(bank.times[origins[i]], tz="UTC").isoformat(),
                   "timestamps": [t.isoformat() for t in times],
                   "quantiles": {f"{q:g}": pred[i, :, j].round(5).tolist() for j, q in enumerate(quantiles)}}
            yield row
            table = pd.DataFrame({"file": str(path), "series_id": name, "step": np.arange(1, len(times) + 1),
                                  "timestamp": [t.isoformat() for t in times],
                                  "local_time": [t.isoformat() for t in times.tz_convert(tz)]})
            for j, q in enumerate(quantiles):
                table[f"q{q:g}"] = pred[i, :, j]
            tables.append(table)
        if opts["plan_charging"]:
            plans += _plans(bank.names, pred, futures, quantiles, opts, path, info)
    out = Path(options["output_dir"])
    _write(pd.concat(tables, ignore_index=True), out / "forecasts", opts["output_format"])
    if opts["plan_charging"]:
        if not plans:
            raise DataError(f"predict.plan_charging=true: no household has both a '<name>{opts['load_suffix']}' and a "
                            f"'<name>{opts['pv_suffix']}' series (predict.load_suffix / predict.pv_suffix)")
        _write(pd.concat(plans, ignore_index=True), out / "battery_plan", opts["output_format"])


def _plans(names, pred, futures, quantiles, opts, path, info) -> list[pd.DataFrame]:
    median = quantiles.index(0.5)
    index = {n: i for i, n in enumerate(names)}
    price_column = opts["price_column"]
    if price_column not in info["known_covariates"]:
        raise ConfigError(f"config key 'predict.price_column': '{price_column}' is not a known-in-advance covariate of "
                          f"this model; valid: {', '.join(info['known_covariates'])}")
    plans = []
    for name in names:
        if not name.endswith(opts["load_suffix"]):
            continue
        household = name[: -len(opts["load_suffix"])]
        pv_name = household + opts["pv_suffix"]
        if pv_name not in index:
            continue
        load = np.clip(pred[index[name], :, median], 0, None)
        pv = np.clip(pred[index[pv_name], :, median], 0, None)
        price = futures[name][price_column].to_numpy(dtype="float64")
        b = opts["battery"]
        step_hours = pd.Timedelta(info["frequency"]) / pd.Timedelta(hours=1)
        plan = plan_battery(load, pv, price, float(b["capacity_kwh"]), float(b["power_kw"]), float(b["initial_kwh"]),
                            float(b["efficiency"]), step_hours)
        plan.insert(0, "timestamp", [t.isoformat() for t in futures[name].index])
        plan.insert(0, "household", household)
        plans.append(plan)
    return plans
