"""Off-peak and grid-aware start times (aifactory_train/launch/start_window.py): the window arithmetic around
midnight and both DST changes of Europe/Amsterdam, the grid-signal choice, and the grid-signal file's refusals. Pure
functions on real files: no Slurm here (test_slurm_accounting.py checks the begin time on the real cluster)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from aifactory_train.errors import ConfigError, DataError
from aifactory_train.launch.start_window import choose_start, next_offpeak, read_grid_signal
from conftest import assert_one_line_naming

AMS = ZoneInfo("Europe/Amsterdam")
UTC = timezone.utc
PROFILE = {"name": "test", "timezone": "Europe/Amsterdam", "offpeak": ["22:00-07:00"], "time_limit": "04:00:00"}


def local(*args) -> datetime:
    return datetime(*args, tzinfo=AMS)


@pytest.mark.parametrize("now, begin", [
    (local(2026, 11, 30, 18, 0), local(2026, 11, 30, 22, 0)),  # before the window: tonight
    (local(2026, 11, 30, 23, 30), local(2026, 11, 30, 23, 30)),  # inside, before midnight: now
    (local(2026, 12, 1, 0, 15), local(2026, 12, 1, 0, 15)),  # inside, after midnight (yesterday's window): now
    (local(2026, 12, 1, 7, 0), local(2026, 12, 1, 22, 0)),  # the window's end is not in it
    (local(2026, 12, 31, 23, 59), local(2026, 12, 31, 23, 59)),  # the year's end
])
def test_next_offpeak_around_midnight(now, begin):
    assert next_offpeak(PROFILE, now) == begin


def test_the_night_the_clocks_go_forward_is_an_hour_shorter():
    # 29 March 2026, 02:00 CET -> 03:00 CEST. The window 22:00-07:00 lasts 8 real hours that night.
    now = local(2026, 3, 28, 20, 0)
    begin = next_offpeak(PROFILE, now)
    assert begin == datetime(2026, 3, 28, 21, 0, tzinfo=UTC)  # 22:00 CET
    assert next_offpeak(PROFILE, datetime(2026, 3, 29, 4, 59, tzinfo=UTC)) == datetime(2026, 3, 29, 4, 59, tzinfo=UTC)  # 06:59 CEST
    assert next_offpeak(PROFILE, datetime(2026, 3, 29, 5, 0, tzinfo=UTC)) == datetime(2026, 3, 29, 20, 0, tzinfo=UTC)  # 07:00 CEST: over; 22:00 CEST
    # a window that starts in the skipped hour starts when the clocks jump (03:00 CEST = 01:00 UTC)
    skipped = {**PROFILE, "offpeak": ["02:30-05:00"]}
    assert next_offpeak(skipped, local(2026, 3, 28, 12, 0)) == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)


def test_the_night_the_clocks_go_back_is_an_hour_longer():
    # 25 October 2026, 03:00 CEST -> 02:00 CET. 22:00 CEST (20:00 UTC) to 07:00 CET (06:00 UTC): 10 real hours.
    assert next_offpeak(PROFILE, local(2026, 10, 24, 12, 0)) == datetime(2026, 10, 24, 20, 0, tzinfo=UTC)
    assert next_offpeak(PROFILE, datetime(2026, 10, 25, 5, 59, tzinfo=UTC)) == datetime(2026, 10, 25, 5, 59, tzinfo=UTC)
    assert next_offpeak(PROFILE, datetime(2026, 10, 25, 6, 0, tzinfo=UTC)) == datetime(2026, 10, 25, 21, 0, tzinfo=UTC)
    # a window that starts in the repeated hour starts the first time the clocks show it (CEST)
    repeated = {**PROFILE, "offpeak": ["02:30-05:00"]}
    assert next_offpeak(repeated, local(2026, 10, 24, 12, 0)) == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)


def write_signal(path: Path, start: datetime, values, fmt=lambda t: t.isoformat()) -> Path:
    rows = ["# facility grid signal, gCO2/kWh", "start,value"]
    rows += [f"{fmt(start + timedelta(hours=i))},{v}" for i, v in enumerate(values)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_grid_start_minimises_the_mean_signal_over_the_duration(tmp_path):
    # hourly signal from 12:00 UTC; a 3-hour job is cheapest from 17:00 (5+1+1)/3, cheaper than now (halfway 12:30)
    values = [10, 10, 9, 8, 6, 5, 1, 1, 7, 9, 9, 9]
    signal = write_signal(tmp_path / "grid.csv", datetime(2026, 11, 30, 12, tzinfo=UTC).astimezone(AMS), values)
    now = datetime(2026, 11, 30, 12, 30, tzinfo=UTC)
    choice = choose_start(PROFILE, timedelta(hours=3), now, signal)
    assert choice.mode == "grid" and choice.begin == datetime(2026, 11, 30, 17, tzinfo=UTC)
    assert choice.signal_begin == pytest.approx((5 + 1 + 1) / 3)
    assert choice.signal_now == pytest.approx((0.5 * 10 + 10 + 9 + 0.5 * 8) / 3)  # 12:30-15:30, time-weighted
    assert choice.saving == pytest.approx(1 - choice.signal_begin / choice.signal_now)
    # the off-peak choice reports its saving against now from the same file (22:00 CET = 21:00 UTC: 9, 9, 9)
    off = choose_start(PROFILE, timedelta(hours=3), now, signal, mode="offpeak")
    assert off.begin == datetime(2026, 11, 30, 21, tzinfo=UTC) and off.signal_begin == pytest.approx(9)
    # the duration defaults to the profile's time limit (4 h): 16:00-20:00 is (6+5+1+1)/4 = 3.25, the lowest
    assert choose_start(PROFILE, None, now, signal).begin == datetime(2026, 11, 30, 16, tzinfo=UTC)


def test_a_grid_file_across_the_dst_change_in_local_time_is_read_as_consecutive_hours(tmp_path):
    # local offsets from 00:00 CEST to 06:00 CET on 25 October: 02:00+02:00 and 02:00+01:00 are both there, once each
    start = datetime(2026, 10, 24, 22, tzinfo=UTC)
    path = write_signal(tmp_path / "grid.csv", start, range(8), fmt=lambda t: t.astimezone(AMS).isoformat())
    assert "02:00:00+02:00" in path.read_text() and "02:00:00+01:00" in path.read_text()
    signal = read_grid_signal(path, AMS)
    assert signal.start == start and signal.end == start + timedelta(hours=8)


@pytest.mark.parametrize("rows, pieces", [
    (["2026-11-30T12:00:00+01:00,5", "2026-11-30T14:00:00+01:00,5"], ["grid.csv:4", "gap after", "consecutive hours"]),
    (["2026-11-30T12:00:00,5", "2026-11-30T13:00:00,5"], ["grid.csv:3", "no time zone", "UTC offset"]),
    (["2026-07-01T12:00:00+01:00,5", "2026-07-01T13:00:00+01:00,5"], ["grid.csv:3", "+01:00", "Europe/Amsterdam is +02:00"]),
    (["2026-11-30T12:00:00Z,5", "2026-11-30T12:00:00Z,6"], ["grid.csv:4", "repeats", "consecutive hours"]),
    (["2026-11-30T12:00:00Z,high"], ["grid.csv:3", "'high'", "finite number"]),
])
def test_a_bad_grid_file_is_one_line_naming_the_line_and_what_is_wrong(tmp_path, rows, pieces):
    path = tmp_path / "grid.csv"
    path.write_text("# a comment\nstart,value\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError) as err:
        read_grid_signal(path, AMS)
    assert_one_line_naming(str(err.value), pieces)


def test_a_grid_file_that_ends_before_the_job_would_is_refused(tmp_path):
    path = write_signal(tmp_path / "grid.csv", datetime(2026, 11, 30, 12, tzinfo=UTC), [1, 2, 3])
    with pytest.raises(DataError, match="ends at .* before a job starting now would end"):
        choose_start(PROFILE, timedelta(hours=4), datetime(2026, 11, 30, 12, tzinfo=UTC), path)


@pytest.mark.parametrize("profile, mode, pieces", [
    ({**PROFILE, "offpeak": []}, "offpeak", ["no off-peak hours", "cluster.offpeak"]),
    ({**PROFILE, "offpeak": ["22-07"]}, "offpeak", ["cluster.offpeak", "'22-07'", "HH:MM-HH:MM"]),
    ({**PROFILE, "timezone": "Europe/Groningen"}, "offpeak", ["cluster.timezone", "Europe/Groningen"]),
    (PROFILE, "grid", ["launch.start=grid", "cluster.grid_signal"]),
])
def test_bad_start_settings_are_one_line(profile, mode, pieces):
    with pytest.raises(ConfigError) as err:
        choose_start(profile, None, datetime(2026, 11, 30, 12, tzinfo=UTC), mode=mode)
    assert_one_line_naming(str(err.value), pieces)


def test_sbatch_begin_is_this_machines_local_time_rounded_up():
    choice = choose_start(PROFILE, None, local(2026, 11, 30, 18, 0, 0, 1), mode="offpeak")
    assert datetime.fromisoformat(choice.sbatch_begin()).astimezone() == local(2026, 11, 30, 22, 0)
