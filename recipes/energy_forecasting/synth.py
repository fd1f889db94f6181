"""Synthetic household energy data: one long-format table (CSV with local-time offsets, or Parquet).

Per household two hourly series, ``<household>:load`` (consumption, kWh per hour) and ``<household>:pv`` (solar
production, kWh per hour), with covariates:

- known in advance: ``temperature_fc`` and ``cloud_fc`` (a weather forecast), ``price`` (day-ahead, EUR/kWh, the same
  for every household), ``holiday`` (Dutch public holidays);
- observed only: ``temperature_obs`` (the measured temperature; the load follows it).

Load has a morning and an evening peak in local time, other on weekends and holidays, more when it is cold. PV
follows a clear-sky curve for Stadskanaal (53.0 N, 6.9 E) scaled by the actual cloud cover (the forecast plus
noise). The period crosses both daylight-saving changes of Europe/Amsterdam when long enough (23- and 25-hour
local days); a few rows are missing, one series has a 30-hour gap, and one a meter reset (a large negative
reading, as a counter that restarts at zero gives when differenced).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from aifactory_train.recipe import DataError, prepare_output_folder, write_datacard

TIMEZONE = "Europe/Amsterdam"
LATITUDE, LONGITUDE = 53.0, 6.9
HOLIDAYS = ["2026-01-01", "2026-04-03", "2026-04-05", "2026-04-06", "2026-04-27", "2026-05-05", "2026-05-14",
            "2026-05-24", "2026-05-25", "2026-12-25", "2026-12-26", "2027-01-01"]
VARIANTS = ("csv", "parquet")
DEFAULT_SIZE = 4       # households (8 series): a CPU demo in minutes; --size 500 for the GPU experiment
DEFAULT_START = "2026-02-01"
DEFAULT_DAYS = 300     # crosses 29 March (23 h) and 25 October (25 h) 2026


def clear_sky(times_utc: pd.DatetimeIndex) -> np.ndarray:
    """Relative clear-sky irradiance in [0, 1]: the sine of the sun's elevation (declination and hour angle)."""
    doy = times_utc.dayofyear.to_numpy()
    hours = times_utc.hour.to_numpy() + times_utc.minute.to_numpy() / 60 + 0.5  # mid-interval
    decl = np.radians(23.44) * np.sin(2 * np.pi * (284 + doy) / 365)
    hour_angle = np.radians(15 * (hours + LONGITUDE / 15 - 12))
    lat = np.radians(LATITUDE)
    elevation = np.sin(lat) * np.sin(decl) + np.cos(lat) * np.cos(decl) * np.cos(hour_angle)
    return np.clip(elevation / np.sin(np.radians(90 - LATITUDE + 23.44)), 0, 1)  # 1 at the midsummer noon sun


def make_frame(households: int, start: str = DEFAULT_START, days: int = DEFAULT_DAYS, seed: int = 0,
               lost: float = 0.003, faults: bool = True) -> pd.DataFrame:
    """The table; ``lost``: the share of rows dropped at random, ``faults``: the outage and the meter reset."""
    rng = np.random.default_rng(seed)
    first = pd.Timestamp(start, tz=TIMEZONE)
    last = first + pd.DateOffset(days=days)
    times = pd.date_range(first.tz_convert("UTC"), last.tz_convert("UTC"), freq="1h", inclusive="left")
    local = times.tz_convert(TIMEZONE)
    n = len(times)
    hour = local.hour.to_numpy()
    doy = local.dayofyear.to_numpy()
    holiday = np.isin(local.strftime("%Y-%m-%d"), HOLIDAYS).astype(float)
    weekend = (local.day_of_week.to_numpy() >= 5) | (holiday > 0)
    # weather: a slow random walk of cloud cover and a seasonal + daily temperature
    cloud = np.clip(0.5 + np.cumsum(rng.normal(0, 0.08, n)) * 0.15, 0, 1)
    cloud = np.clip(cloud + 0.35 * np.sin(np.cumsum(rng.normal(0, 0.05, n))), 0, 1)
    temperature = (10 - 8 * np.cos(2 * np.pi * (doy - 20) / 365) + 3 * np.sin(2 * np.pi * (hour - 9) / 24)
                   + np.cumsum(rng.normal(0, 0.25, n)) * 0.2 - 3 * cloud)
    temperature_fc = temperature + rng.normal(0, 1.0, n)
    cloud_fc = np.clip(cloud + rng.normal(0, 0.12, n), 0, 1)
    sky = clear_sky(times)
    # day-ahead price: morning and evening peaks, a dip when the sun shines (EUR/kWh)
    price = (0.10 + 0.06 * np.exp(-((hour - 8) ** 2) / 4) + 0.09 * np.exp(-((hour - 19) ** 2) / 5)
             - 0.08 * sky * (1 - cloud) + rng.normal(0, 0.01, n) - 0.02 * weekend)
    rows = []
    for h in range(households):
        name = f"h{h:03d}"
        size = rng.uniform(0.5, 1.5)
        shift = rng.integers(-1, 2)
        workday = 0.25 + 0.5 * np.exp(-((hour - 7 - shift) ** 2) / 2) + 0.9 * np.exp(-((hour - 19 - shift) ** 2) / 6)
        weekendday = 0.3 + 0.45 * np.exp(-((hour - 11) ** 2) / 8) + 0.8 * np.exp(-((hour - 18) ** 2) / 8)
        heating = 0.04 * np.clip(15 - temperature, 0, None)
        load = size * (np.where(weekend, weekendday, workday) + heating) * rng.lognormal(0, 0.15, n)
        kwp = rng.uniform(2.0, 6.0)
        pv = kwp * 0.8 * sky * (1 - 0.8 * cloud ** 2) * rng.lognormal(0, 0.08, n)
        for kind, values in (("load", load), ("pv", pv)):
            frame = pd.DataFrame({"series_id": f"{name}:{kind}", "timestamp": local, "value": np.round(values, 4),
                                  "temperature_fc": np.round(temperature_fc, 2), "cloud_fc": np.round(cloud_fc, 3),
                                  "price": np.round(price, 4), "holiday": holiday,
                                  "temperature_obs": np.round(temperature, 2)})
            keep = rng.random(n) >= lost  # a few lost readings
            rows.append(frame[keep])
    frame = pd.concat(rows, ignore_index=True)
    if faults:  # a 30-hour outage of the first household's meter, a meter reset in the second's load
        outage = (frame["series_id"] == "h000:load") & (frame["timestamp"] >= first + pd.Timedelta(days=20)) & (
            frame["timestamp"] < first + pd.Timedelta(days=20, hours=30))
        frame = frame[~outage]
        reset = frame.index[frame["series_id"] == f"h{min(1, households - 1):03d}:load"][len(times) // 3]
        frame.loc[reset, "value"] = -4812.0
    return frame.reset_index(drop=True)


def synthesize(out: str | Path, size: int | None = None, seed: int = 0, variant: str | None = None,
               overwrite: bool = False, days: int | None = None, start: str | None = None) -> Path:
    """Write ``energy.csv`` (timestamps in local time with their offset) or ``energy.parquet`` under ``out``."""
    variant = variant or "csv"
    if variant not in VARIANTS:
        raise DataError(f"--variant '{variant}' is not valid for energy_forecasting; valid variants: {', '.join(VARIANTS)}")
    size = DEFAULT_SIZE if size is None else size
    if size < 1:
        raise DataError(f"--size {size} is too small: at least one household is needed")
    out = prepare_output_folder(out, overwrite, owned=("energy.csv", "energy.parquet"))
    frame = make_frame(size, start or DEFAULT_START, days or DEFAULT_DAYS, seed)
    if variant == "csv":
        frame = frame.assign(timestamp=frame["timestamp"].map(lambda t: t.isoformat()))
        frame.to_csv(out / "energy.csv", index=False)
    else:
        frame.to_parquet(out / "energy.parquet", index=False)
    write_datacard(out, {
        "name": f"energy_forecasting synthetic ({size} households, {days or DEFAULT_DAYS} days)",
        "owner": "AI Factory Groningen (generated demo data)",
        "license": "CC0-1.0",
        "consent": "not applicable: synthetic households, no people or company data",
        "source": f"aift data synth energy_forecasting --size {size} --seed {seed} --variant {variant}",
        "description": "Hourly household load and PV (kWh per hour), weather forecasts, day-ahead prices, holidays; "
                       "Europe/Amsterdam time with both DST changes, gaps and a meter reset",
    })
    return out
