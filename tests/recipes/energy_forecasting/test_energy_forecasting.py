"""energy_forecasting: reading and its bad inputs, UTC/DST, gaps, time splits, train-only scaling, no look-ahead,
the battery plan's limits, and one trained run (module fixture) reused by the backtest, predict and export tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aifactory_train.errors import ConfigError, DataError
from aifactory_train.recipes.energy_forecasting import frames
from aifactory_train.recipes.energy_forecasting.data import EnergyDataModule
from aifactory_train.recipes.energy_forecasting.predict import plan_battery
from aifactory_train.recipes.energy_forecasting.synth import make_frame
from conftest import aift, assert_one_line_naming

COLUMNS = {"series": "series_id", "timestamp": "timestamp", "target": "value"}
KNOWN = ["temperature_fc", "cloud_fc", "price", "holiday"]
OBSERVED = ["temperature_obs"]
TZ = "Europe/Amsterdam"


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    frame = frame.copy()
    if isinstance(frame["timestamp"].dtype, pd.DatetimeTZDtype):
        frame["timestamp"] = frame["timestamp"].map(lambda t: t.isoformat())
    frame.to_csv(path, index=False)
    return path


def small_frame(days: int = 30, households: int = 1, start: str = "2026-03-01") -> pd.DataFrame:
    return make_frame(households, start=start, days=days, seed=1)


def dm(root: Path, file: str = "energy.csv", **kwargs) -> EnergyDataModule:
    settings = dict(known_covariates=KNOWN, observed_covariates=OBSERVED, history=48, horizon=24,
                    split={"val_days": 3, "test_days": 3}, train_stride=1)
    settings.update(kwargs)
    return EnergyDataModule(root=str(root), file=file, **settings)


# -- bad input: one line naming file, row and column ----------------------------------------------
def test_timestamp_without_zone_names_file_line_and_column(tmp_path):
    frame = small_frame(3)
    frame["timestamp"] = frame["timestamp"].map(lambda t: t.isoformat())
    frame.loc[5, "timestamp"] = "2026-03-01T05:00:00"
    path = write_csv(frame, tmp_path / "e.csv")
    with pytest.raises(DataError) as err:
        frames.read_table(path, COLUMNS, KNOWN, True, TZ)
    assert_one_line_naming(str(err.value), [str(path), "line 7", "'timestamp'", "2026-03-01T05:00:00", "no time zone"])
    # with require_timezone=false the naive stamp is local time: 05:00 CET is 04:00 UTC
    table = frames.read_table(path, COLUMNS, KNOWN, False, TZ)
    assert table.at[5, "timestamp"] == pd.Timestamp("2026-03-01T04:00:00Z")


def test_duplicate_series_timestamp_names_both_lines(tmp_path):
    frame = small_frame(3)
    frame = pd.concat([frame, frame.iloc[[10]]], ignore_index=True)
    path = write_csv(frame, tmp_path / "e.csv")
    with pytest.raises(DataError) as err:
        frames.read_table(path, COLUMNS, KNOWN, True, TZ)
    assert_one_line_naming(str(err.value), [str(path), "line 12", f"line {len(frame) + 1}", "h000:load", "duplicate"])


def test_non_numeric_target_names_line_column_and_value(tmp_path):
    frame = small_frame(3)
    frame["value"] = frame["value"].astype(object)
    frame.loc[20, "value"] = "1,25 kWh"
    path = write_csv(frame, tmp_path / "e.csv")
    with pytest.raises(DataError) as err:
        frames.read_table(path, COLUMNS, KNOWN, True, TZ)
    assert_one_line_naming(str(err.value), [str(path), "line 22", "'value'", "'1,25 kWh'", "not a number"])


def test_series_shorter_than_history_plus_horizon_is_named(tmp_path):
    frame = small_frame(20)
    frame = frame[~((frame.series_id == "h000:pv") & (frame.timestamp > frame.timestamp.min() + pd.Timedelta(hours=40)))]
    write_csv(frame, tmp_path / "energy.csv")
    with pytest.raises(DataError) as err:
        dm(tmp_path).setup("fit")
    assert_one_line_naming(str(err.value), ["energy.csv", "'h000:pv'", "shorter than data.history + data.horizon = 72"])


def test_test_windows_overlapping_training_windows_are_refused(tmp_path):
    write_csv(small_frame(20), tmp_path / "energy.csv")
    split = {"val_start": "2026-03-15T00:00:00+01:00", "test_start": "2026-03-12T00:00:00+01:00"}
    with pytest.raises(ConfigError) as err:
        dm(tmp_path, split=split).setup("fit")
    assert_one_line_naming(str(err.value), ["data.split.test_start", "overlap training", "2026-03-11T23:00:00+00:00"])
    # and the schema refuses it before any data is read (aift train, aift launch)
    from aifactory_train.recipes.energy_forecasting.config import SplitConfig

    with pytest.raises(ConfigError) as err:
        SplitConfig(**split).check()
    assert_one_line_naming(str(err.value), ["data.split.test_start", "2026-03-12T00:00:00+01:00", "overlap training"])


# -- time: UTC grid, DST days, local features, baselines ----------------------------------------
def test_dst_days_are_23_and_25_steps_and_local_features_follow_them(tmp_path):
    frame = make_frame(1, start="2026-03-27", days=4, seed=0, lost=0, faults=False)
    fall = make_frame(1, start="2026-10-24", days=4, seed=0, lost=0, faults=False)
    for f, day, steps in ((frame, "2026-03-29", 23), (fall, "2026-10-25", 25)):
        table = frames.read_table(write_csv(f, tmp_path / f"{day}.csv"), COLUMNS, KNOWN + OBSERVED, True, TZ)
        s = frames.build_series(table, KNOWN, OBSERVED, "1h", TZ, "mask", 3, None, frames.GapCounts(),
                                tmp_path)["h000:load"]
        assert (np.diff(s.times.asi8) == 3600 * 10**9).all()  # a regular UTC grid
        local = s.times.tz_convert(TZ)
        on_day = local.strftime("%Y-%m-%d") == day
        assert on_day.sum() == steps
        hours = (np.degrees(np.arctan2(s.calendar[on_day, 0], s.calendar[on_day, 1])) / 15) % 24
        assert sorted(set(np.round(hours).astype(int))) == sorted(set(local[on_day].hour))
        # same local time yesterday: 12:00 on the day of the change is `steps` hourly steps back, the next day 24
        noon = int(np.flatnonzero(on_day & (local.hour == 12))[0])
        assert s.baselines[noon, 0] == s.target[noon - steps] and local[noon - steps].hour == 12
        assert s.baselines[noon + 24, 0] == s.target[noon]


def test_csv_with_local_offsets_and_parquet_give_the_same_utc_table(tmp_path):
    frame = make_frame(1, start="2026-10-24", days=3, seed=0)
    csv = frames.read_table(write_csv(frame, tmp_path / "e.csv"), COLUMNS, KNOWN, True, TZ)
    frame.to_parquet(tmp_path / "e.parquet")
    parquet = frames.read_table(tmp_path / "e.parquet", COLUMNS, KNOWN, True, TZ)
    assert csv["timestamp"].equals(parquet["timestamp"]) and str(csv["timestamp"].dt.tz) == "UTC"
    assert csv.loc[csv.series == "h000:load", "timestamp"].is_unique  # the two 02:00 local hours of 25 October are two UTC hours


# -- gaps, splits, scaling ---------------------------------------------------------------------------
def gappy_table(tmp_path: Path) -> pd.DataFrame:
    frame = make_frame(1, start="2026-03-01", days=20, seed=1, lost=0, faults=False)
    frame = frame[frame.series_id == "h000:pv"].reset_index(drop=True)
    t0 = frame.timestamp.min()
    short = (frame.timestamp >= t0 + pd.Timedelta(hours=100)) & (frame.timestamp < t0 + pd.Timedelta(hours=102))
    long = (frame.timestamp >= t0 + pd.Timedelta(hours=200)) & (frame.timestamp < t0 + pd.Timedelta(hours=210))
    frame = frame[~(short | long)].copy()
    frame.loc[frame.index[300], "value"] = -900.0  # a meter reset
    return frames.read_table(write_csv(frame, tmp_path / "g.csv"), COLUMNS, KNOWN + OBSERVED, True, TZ)


@pytest.mark.parametrize("policy", ["interpolate", "mask", "drop_window"])
def test_gap_policies_are_applied_and_counted(policy, tmp_path):
    table = gappy_table(tmp_path)
    counts = frames.GapCounts()
    series = frames.build_series(table, KNOWN, OBSERVED, "1h", TZ, policy, 3, 0.0, counts, tmp_path)
    s = series["h000:pv"]
    assert counts.missing_steps == 12 and counts.meter_resets == 1
    if policy == "interpolate":
        assert counts.interpolated == 3  # the 2-step gap and the reset; the 10-step gap stays missing
        assert np.isnan(s.target).sum() == 10
    else:
        assert counts.interpolated == 0 and np.isnan(s.target).sum() == 13
    scaling = frames.fit_scaling(series, s.times[-1], KNOWN, OBSERVED)
    bank = frames.Bank(series, scaling, KNOWN, OBSERVED)
    origins, dropped = frames.window_origins(bank, 0, 48, 24, None, 1, None, policy)
    if policy == "mask":
        assert dropped == 0
    else:
        assert dropped >= 24 + 10  # every window whose history or target touches the long gap
        assert all(bank.present[o - 47:o + 25].all() for o in origins)


def test_splits_are_by_time_and_scaling_uses_training_rows_only(tmp_path):
    frame = small_frame(20)
    write_csv(frame, tmp_path / "energy.csv")
    first = dm(tmp_path)
    first.setup("fit")
    val_start = pd.Timestamp(first.starts["val_start"]).value
    test_start = pd.Timestamp(first.starts["test_start"]).value
    bank = first.bank
    for split, ds in first.datasets.items():
        ends = bank.times[ds.origins + 24]
        starts = bank.times[ds.origins + 1]
        if split == "train":
            assert (ends < val_start).all()
        elif split == "val":
            assert (starts >= val_start).all() and (ends < test_start).all()
        else:
            assert (starts >= test_start).all() and len(ds) > 0
    # a change after val_start leaves the scaling alone; one before it moves it
    later = frame.copy()
    later.loc[later.timestamp >= pd.Timestamp(val_start, tz="UTC"), "value"] *= 5
    write_csv(later, tmp_path / "energy.csv")
    second = dm(tmp_path)
    second.setup("fit")
    assert second.scaling == first.scaling
    earlier = frame.copy()
    earlier.loc[earlier.timestamp < pd.Timestamp(val_start, tz="UTC"), "value"] *= 2
    write_csv(earlier, tmp_path / "energy.csv")
    third = dm(tmp_path)
    third.setup("fit")
    assert third.scaling["target"]["h000:load"] != first.scaling["target"]["h000:load"]


# -- the battery plan ------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_battery_plan_keeps_the_battery_limits(seed):
    rng = np.random.default_rng(seed)
    hours = np.arange(24)
    load = rng.uniform(0.2, 2.5, 24)
    pv = np.clip(4 * np.sin((hours - 6) / 12 * np.pi), 0, None) * rng.uniform(0, 1.2)
    price = 0.1 + 0.1 * rng.random(24)
    capacity, power, initial = rng.uniform(2, 12), rng.uniform(0.5, 4), 0.0
    plan = plan_battery(load, pv, price, capacity, power, initial, efficiency=0.9)
    assert (plan.soc_kwh >= -1e-9).all() and (plan.soc_kwh <= capacity + 1e-9).all()
    charge = plan.solar_charge_kw + plan.grid_charge_kw
    assert (charge <= power + 1e-9).all() and (plan.discharge_kw <= power + 1e-9).all()
    assert not ((charge > 0) & (plan.discharge_kw > 0)).any()
    assert (plan.solar_charge_kw <= np.clip(pv - load, 0, None) + 1e-9).all()  # only real surplus
    assert (plan.discharge_kw <= np.clip(load - pv, 0, None) + 1e-9).all()  # no export from the battery
    cheapest = set(np.argsort(price, kind="stable")[: int(np.ceil(capacity / power))])
    assert set(np.flatnonzero(plan.grid_charge_kw > 0)) <= cheapest
    # the energy balance: what went in (after losses) minus what came out is the final charge
    eta = np.sqrt(0.9)
    assert abs(initial + (charge * eta).sum() - (plan.discharge_kw / eta).sum() - plan.soc_kwh.iloc[-1]) < 1e-6


def test_battery_plan_uses_solar_surplus_before_the_grid():
    load = np.full(24, 0.5)
    pv = np.zeros(24)
    pv[10:15] = 3.0  # 12.5 kWh surplus around noon
    price = np.full(24, 0.2)
    price[2:5] = 0.05  # cheap at night
    plan = plan_battery(load, pv, price, capacity_kwh=10.0, power_kw=5.0)
    assert plan.grid_charge_kw.sum() == 0  # the coming surplus fills the battery; no grid energy is bought
    assert plan.soc_kwh.max() == pytest.approx(10.0)


# -- one trained run: backtest, no look-ahead, predict, export -----------------------------------------
@pytest.fixture(scope="module")
def energy_run(energy_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("energy_run")
    result = aift("train", "recipe=energy_forecasting", f"data.root={energy_data}", "trainer.max_epochs=8",
                  "data.split.val_days=5", "data.split.test_days=7", "data.batch_size=64", "model.hidden=64",
                  f"tracking.uri=sqlite:///{work}/mlflow.db", "trainer.enable_progress_bar=false",
                  f"hydra.run.dir={work}/run", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "run"


@pytest.mark.e2e
def test_backtest_reports_skill_against_both_baselines(energy_run):
    summary = json.loads((energy_run / "summary.json").read_text())
    metrics = json.loads((energy_run / "reports" / "backtest_metrics.json").read_text())
    for key in ("mae", "rmse", "pinball_q10", "pinball_q50", "pinball_q90", "coverage", "skill_vs_yesterday",
                "skill_vs_last_week"):
        assert np.isfinite(metrics[key]), key
    assert metrics["skill_vs_yesterday"] == pytest.approx(1 - metrics["mae"] / metrics["mae_yesterday"])
    assert metrics["skill_vs_yesterday"] > 0 and metrics["skill_vs_last_week"] > 0, metrics
    assert 0.5 < metrics["coverage"] <= 1.0
    assert metrics["windows"] == 4 * 7  # four series, a rolling origin every day of the 7-day test period
    for name in ("fan_charts.png", "error_by_horizon.png", "coverage_by_horizon.png", "backtest_by_horizon.csv"):
        assert (energy_run / "reports" / name).stat().st_size > 0
    assert json.dumps(summary).count("skill_vs_last_week") >= 1


def latest(energy_data: Path, cut_hours: int = 24) -> pd.DataFrame:
    """The demo data's last two weeks, the final ``cut_hours`` with empty targets: history + future covariates."""
    frame = pd.read_csv(energy_data / "energy.csv")
    stamps = pd.to_datetime(frame.timestamp, utc=True)
    frame = frame[stamps >= stamps.max() - pd.Timedelta(days=14)].copy()
    future = pd.to_datetime(frame.timestamp, utc=True) > stamps.max() - pd.Timedelta(hours=cut_hours)
    frame.loc[future, ["value", "temperature_obs"]] = np.nan
    return frame


def loaded_module(run: Path):
    from aifactory_train.recipes.energy_forecasting.module import EnergyForecastingModule

    return EnergyForecastingModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu").eval()


@pytest.mark.e2e
def test_no_look_ahead_future_observed_covariates_do_not_change_a_forecast(energy_run, energy_data, tmp_path):
    import torch

    from aifactory_train.recipes.energy_forecasting.predict import forecast, forecast_inputs

    module = loaded_module(energy_run)
    info = module.hparams.data_info

    def run(frame: pd.DataFrame) -> np.ndarray:
        path = write_csv(frame, tmp_path / "in.csv")
        table = frames.read_table(path, info["columns"], KNOWN + OBSERVED, True, TZ)
        bank, origins, _ = forecast_inputs(table, info, path)
        with torch.no_grad():
            return forecast(module, bank, origins, 8)

    frame = latest(energy_data)
    base = run(frame)
    future = frame["value"].isna()
    rng = np.random.default_rng(0)
    for values in (rng.normal(0, 50, future.sum()), np.full(future.sum(), 1e6), np.full(future.sum(), np.nan)):
        perturbed = frame.copy()
        perturbed.loc[future, "temperature_obs"] = values
        assert np.array_equal(run(perturbed), base)
    # the check can fail: the same change before the origin does change the forecast
    past = frame.copy()
    past.loc[~future, "temperature_obs"] += 15
    assert not np.allclose(run(past), base)
    # and a known covariate in the future is used
    known = frame.copy()
    known.loc[future, "cloud_fc"] = 1.0
    assert not np.allclose(run(known), base)


def test_window_inputs_hold_no_observed_value_after_the_origin(energy_data):
    datamodule = dm(energy_data, history=168, split={"val_days": 5, "test_days": 7})
    datamodule.setup("test")
    ds = datamodule.datasets["test"]
    before = ds[0]
    o = int(ds.origins[0])
    datamodule.bank.obs[o + 1:o + 25] += 100.0
    datamodule.bank.y[o + 1:o + 25] += 100.0
    after = ds[0]
    assert np.array_equal(before["past"], after["past"]) and np.array_equal(before["future"], after["future"])


@pytest.mark.e2e
def test_predict_writes_quantiles_and_a_battery_plan(energy_run, energy_data, tmp_path):
    frame = latest(energy_data)
    (tmp_path / "in").mkdir()
    write_csv(frame, tmp_path / "in" / "latest.csv")
    out = tmp_path / "pred"
    result = aift("predict", "recipe=energy_forecasting", f"ckpt_path={energy_run}/checkpoints/last.ckpt",
                  f"input={tmp_path / 'in' / 'latest.csv'}", "predict.plan_charging=true", "predict.battery.capacity_kwh=5",
                  "predict.battery.power_kw=2", f"hydra.run.dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["series_id"] for r in rows) == ["h000:load", "h000:pv", "h001:load", "h001:pv"]
    for r in rows:
        q = np.array([r["quantiles"][k] for k in ("0.1", "0.5", "0.9")])
        assert q.shape == (3, 24) and (q[0] <= q[1]).all() and (q[1] <= q[2]).all()
    table = pd.read_csv(out / "forecasts.csv")
    assert len(table) == 4 * 24 and {"q0.1", "q0.5", "q0.9", "local_time"} <= set(table.columns)
    plan = pd.read_csv(out / "battery_plan.csv")
    assert set(plan.household) == {"h000", "h001"} and len(plan) == 48
    assert plan.soc_kwh.between(0, 5 + 1e-9).all()
    assert (plan[["solar_charge_kw", "grid_charge_kw", "discharge_kw"]] <= 2 + 1e-9).all().all()


@pytest.mark.e2e
def test_known_covariate_missing_in_the_future_frame_is_named(energy_run, energy_data, tmp_path):
    from aifactory_train.recipes.energy_forecasting.predict import forecast_inputs

    info = loaded_module(energy_run).hparams.data_info
    frame = latest(energy_data)
    stamps = pd.to_datetime(frame.timestamp, utc=True)
    frame.loc[(frame.series_id == "h001:pv") & (stamps == stamps.max()), "price"] = np.nan
    path = write_csv(frame, tmp_path / "future.csv")
    table = frames.read_table(path, info["columns"], KNOWN + OBSERVED, True, TZ)
    with pytest.raises(DataError) as err:
        forecast_inputs(table, info, path)
    assert_one_line_naming(str(err.value), [str(path), "column 'price'", "'h001:pv'", stamps.max().isoformat(),
                                            "known in advance"])


@pytest.mark.e2e
def test_onnx_export_matches_pytorch(energy_run, tmp_path):
    import onnxruntime as ort
    import torch

    from aifactory_train.recipes.energy_forecasting.export import DeployableForecaster

    out = tmp_path / "export"
    result = aift("export", "recipe=energy_forecasting", f"ckpt_path={energy_run}/checkpoints/last.ckpt", "format=onnx",
                  f"hydra.run.dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "provenance.json").is_file()
    parity = json.loads((out / "export.json").read_text())["parity"]  # aift export's own check, on test windows
    assert parity["passed"] and parity["inputs"]["records"] >= 1 and parity["max_abs_diff"] <= parity["tolerance"]
    module = loaded_module(energy_run)
    meta = json.loads((out / "model.json").read_text())
    assert meta["quantiles"] == [0.1, 0.5, 0.9] and meta["history"] == 168
    assert meta["features"]["future"][: len(KNOWN)] == KNOWN and "temperature_obs" not in meta["features"]["future"]
    assert set(meta["scaling"]["target"]) == {"h000:load", "h000:pv", "h001:load", "h001:pv"}
    rng = np.random.default_rng(0)
    past = rng.normal(size=(5, 168, len(meta["features"]["past"]))).astype("float32")
    future = rng.normal(size=(5, 24, len(meta["features"]["future"]))).astype("float32")
    loc, scale = rng.uniform(0, 1, 5).astype("float32"), rng.uniform(0.5, 2, 5).astype("float32")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"past": past, "future": future, "loc": loc, "scale": scale})
    with torch.no_grad():
        want = DeployableForecaster(module.net)(*map(torch.from_numpy, (past, future, loc, scale))).numpy()
    assert np.abs(got - want).max() < 1e-4


def test_data_check_names_windows_and_finds_no_target_period_in_two_splits(energy_data):
    from aifactory_train.recipes.energy_forecasting.check import describe

    datamodule = dm(energy_data, history=168, split={"val_days": 5, "test_days": 7})
    datamodule.setup("fit")
    description = describe(datamodule)
    assert {s: d.count for s, d in description.splits.items()} == {s: len(d) for s, d in datamodule.datasets.items()}
    hashes = [set(d.record_hashes) for d in description.splits.values()]
    assert all(not (a & b) for i, a in enumerate(hashes) for b in hashes[i + 1:])
    assert description.splits["test"].record_ids[0].startswith("h000:load @ ")
    assert description.invalid["missing steps"] == datamodule.counts.missing_steps > 0
