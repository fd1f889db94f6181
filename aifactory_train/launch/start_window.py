"""When a job should start: now, in the cluster profile's next off-peak window, or at the hour that minimises the
facility's grid signal (congestion, price or carbon intensity) over the job's planned duration.

``choose_start(profile, duration, now, signal_file)`` is the one entry point (``aift launch`` uses it for
``sbatch --begin``; a planner can call it too). Times are timezone-aware throughout; the off-peak hours are wall-clock
times in the profile's ``timezone`` (Europe/Amsterdam), computed with the standard library's zoneinfo, so a window
that crosses midnight or a DST change lasts what the clocks say (22:00-07:00 is 8 h on the night the clocks go
forward, 10 h on the night they go back).

The grid-signal file (CSV, UTF-8) has a header row ``start,value`` and one row per hour:
``start`` is the hour's start as ISO 8601 with its UTC offset (``2026-03-29T03:00:00+02:00`` or ``...Z``), either
UTC or the profile's timezone's offset at that instant; ``value`` is a number where lower is better (gCO2/kWh,
EUR/MWh, a congestion index). Rows are consecutive hours without gaps or repeats. Lines starting with # are comments.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from aifactory_train.errors import ConfigError, DataError

HOUR = timedelta(hours=1)


@dataclass(frozen=True)
class StartChoice:
    mode: str  # now | offpeak | grid
    begin: datetime  # aware; == now when the job may start at once
    saving: float | None = None  # 1 - mean signal from `begin` / mean signal from now, over the duration (grid file)
    signal_now: float | None = None  # mean signal over the duration, starting now
    signal_begin: float | None = None  # ... starting at `begin`
    why: str = ""
    timezone: str = "UTC"  # the profile's, to show the begin in

    def local_begin(self) -> datetime:
        return self.begin.astimezone(ZoneInfo(self.timezone))

    def immediate(self, now: datetime) -> bool:
        return self.begin <= now

    def sbatch_begin(self) -> str:
        """``sbatch --begin`` value: sbatch reads a local time of the submitting machine, so the begin is written in
        this machine's time zone, whole seconds rounded up (never before the chosen instant)."""
        local = self.begin.astimezone()
        if local.microsecond:
            local = local.replace(microsecond=0) + timedelta(seconds=1)
        return local.replace(tzinfo=None).isoformat(timespec="seconds")


def _get(profile: Any, key: str, default: Any = None) -> Any:
    return profile.get(key, default) if isinstance(profile, dict) else getattr(profile, key, default)


def profile_zone(profile: Any) -> ZoneInfo:
    name = _get(profile, "timezone") or "Europe/Amsterdam"
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"cluster.timezone '{name}' is not a time zone; use an IANA name such as Europe/Amsterdam (zoneinfo reads the "
                          f"system's time zone database: the tzdata package)") from None


def parse_windows(windows: list[str]) -> list[tuple[time, time]]:
    """'HH:MM-HH:MM' windows; an end at or before the start crosses midnight (22:00-06:00)."""
    parsed = []
    for text in windows or []:
        try:
            start, end = (datetime.strptime(part.strip(), "%H:%M").time() for part in str(text).split("-"))
        except ValueError:
            raise ConfigError(f"cluster.offpeak: '{text}' is not a window; give local wall-clock hours as "
                              f"HH:MM-HH:MM, e.g. 22:00-07:00") from None
        if start == end:
            raise ConfigError(f"cluster.offpeak: '{text}' is empty (start = end); give e.g. 22:00-07:00")
        parsed.append((start, end))
    return parsed


def _exists(naive: datetime, zone: ZoneInfo) -> bool:
    back = naive.replace(tzinfo=zone).astimezone(timezone.utc).astimezone(zone).replace(tzinfo=None)
    return back == naive


def local_instant(day: date, clock: time, zone: ZoneInfo) -> datetime:
    """``clock`` on ``day`` in ``zone`` as an aware instant. A clock time the DST change skips (02:30 on the night
    the clocks go forward) is the moment the clocks jump (03:00); a repeated one (02:30 when they go back) is the
    first."""
    naive = datetime.combine(day, clock)
    for _ in range(180):  # a skipped stretch is at most an hour (two in a few historic zones)
        if _exists(naive, zone):
            # in UTC: Python compares and adds datetimes of one zone by wall clock, which is wrong across DST
            return naive.replace(tzinfo=zone, fold=0).astimezone(timezone.utc)
        naive = (naive + timedelta(minutes=1)).replace(second=0, microsecond=0)
    raise ConfigError(f"cluster.timezone {zone.key}: {day} {clock} does not exist")  # not reached in real zones


def offpeak_intervals(windows: list[tuple[time, time]], zone: ZoneInfo, around: datetime) -> list[tuple[datetime, datetime]]:
    """The windows' real intervals from the day before ``around`` to two days after, sorted."""
    local_day = around.astimezone(zone).date()
    intervals = []
    for offset in range(-1, 3):
        day = local_day + timedelta(days=offset)
        for start, end in windows:
            end_day = day + timedelta(days=1) if end <= start else day
            intervals.append((local_instant(day, start, zone), local_instant(end_day, end, zone)))
    return sorted(intervals)


def next_offpeak(profile: Any, now: datetime) -> datetime:
    """``now`` if it is inside an off-peak window, else the start of the next one."""
    windows = parse_windows(_get(profile, "offpeak") or [])
    if not windows:
        raise ConfigError(f"launch.start=offpeak but cluster '{_get(profile, 'name')}' has no off-peak hours; set "
                          f"cluster.offpeak, e.g. ['22:00-07:00']")
    zone = profile_zone(profile)
    now = now.astimezone(timezone.utc)
    for start, end in offpeak_intervals(windows, zone, now):
        if start <= now < end:
            return now
        if start > now:
            return start
    raise AssertionError("a daily window always starts within two days")


@dataclass(frozen=True)
class GridSignal:
    start: datetime  # aware, of the first hour
    values: list[float]  # one per hour

    @property
    def end(self) -> datetime:
        return self.start + len(self.values) * HOUR

    def mean(self, begin: datetime, duration: timedelta) -> float:
        """The time-weighted mean of the signal over [begin, begin + duration)."""
        end = begin + duration
        total, t = 0.0, begin
        while t < end:
            index = int((t - self.start) // HOUR)
            hour_end = self.start + (index + 1) * HOUR
            step = min(hour_end, end) - t
            total += self.values[index] * step.total_seconds()
            t += step
        return total / duration.total_seconds()


def read_grid_signal(path: str | Path, zone: ZoneInfo) -> GridSignal:
    """The facility's hourly grid signal; DataError names the file, line and what is wrong (no time zone, an offset
    that is neither UTC nor ``zone``'s, a gap or repeat, a value that is not a number)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: the grid-signal file (cluster.grid_signal) does not exist")
    with path.open(newline="", encoding="utf-8") as handle:
        lines = [(number, row) for number, row in enumerate(csv.reader(handle), 1)
                 if row and not row[0].lstrip().startswith("#")]
    if not lines or [c.strip() for c in lines[0][1][:2]] != ["start", "value"]:
        raise DataError(f"{path}: the first row must be the header 'start,value' (hour start with UTC offset, number)")
    times, values = [], []
    for number, row in lines[1:]:
        where = f"{path}:{number}"
        if len(row) < 2:
            raise DataError(f"{where}: {','.join(row)!r} has no value; rows are start,value")
        stamp_text, value_text = row[0].strip(), row[1].strip()
        try:
            stamp = datetime.fromisoformat(stamp_text.replace("Z", "+00:00"))
        except ValueError:
            raise DataError(f"{where}: start {stamp_text!r} is not an ISO 8601 time such as 2026-03-29T03:00:00+02:00") from None
        if stamp.tzinfo is None:
            raise DataError(f"{where}: start {stamp_text!r} has no time zone; write its UTC offset "
                            f"(2026-03-29T03:00:00+02:00 in {zone.key}) or Z for UTC")
        offset = stamp.utcoffset()
        local = stamp.astimezone(zone).utcoffset()
        if offset != timedelta(0) and offset != local:
            raise DataError(f"{where}: start {stamp_text!r} has offset {_offset(offset)}, but {zone.key} is "
                            f"{_offset(local)} at that time; write the profile's local time or UTC (Z)")
        if stamp.minute or stamp.second or stamp.microsecond:
            raise DataError(f"{where}: start {stamp_text!r} is not on the hour; rows are whole hours")
        try:
            value = float(value_text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise DataError(f"{where}: value {value_text!r} is not a finite number")
        if times and stamp != times[-1] + HOUR:
            previous = times[-1].astimezone(zone).isoformat()
            problem = "repeats or goes back from" if stamp <= times[-1] else "leaves a gap after"
            raise DataError(f"{where}: start {stamp_text!r} {problem} {previous}; rows are consecutive hours")
        times.append(stamp.astimezone(timezone.utc))
        values.append(value)
    if not values:
        raise DataError(f"{path}: no hours after the header")
    return GridSignal(times[0].astimezone(timezone.utc), values)


def _offset(delta: timedelta) -> str:
    minutes = int(delta.total_seconds() // 60)
    return f"{'+' if minutes >= 0 else '-'}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def best_grid_start(signal: GridSignal, duration: timedelta, now: datetime) -> tuple[datetime, float, float]:
    """(begin, mean from begin, mean from now): the start, now or a later whole hour, with the lowest mean signal
    over ``duration``, among those the file covers (ties: the earliest)."""
    if not signal.start <= now:
        raise DataError(f"the grid signal starts at {signal.start.isoformat()}, after now ({now.isoformat()}); it "
                        f"must cover the time from now")
    if now + duration > signal.end:
        raise DataError(f"the grid signal ends at {signal.end.isoformat()}, before a job starting now would end "
                        f"({(now + duration).isoformat()}, {duration} later); supply at least that much")
    now_mean = signal.mean(now, duration)
    best, best_mean = now, now_mean
    candidate = signal.start + math.ceil((now - signal.start) / HOUR) * HOUR
    while candidate + duration <= signal.end:
        if candidate > now:
            mean = signal.mean(candidate, duration)
            if mean < best_mean - 1e-12:
                best, best_mean = candidate, mean
        candidate += HOUR
    return best, best_mean, now_mean


def duration_of(time_limit: str) -> timedelta:
    """Slurm's [days-]hh:mm:ss as a timedelta."""
    days, _, clock = str(time_limit).rpartition("-")
    hours, minutes, seconds = (int(x) for x in clock.split(":"))
    return timedelta(days=int(days or 0), hours=hours, minutes=minutes, seconds=seconds)


def choose_start(profile: Any, duration: timedelta | None, now: datetime | None = None,
                 signal_file: str | Path | None = None, mode: str | None = None) -> StartChoice:
    """When the job should begin. ``mode``: now | offpeak | grid (default: grid with a signal file, else offpeak).
    ``duration``: the planned run time (None: the profile's time limit). With a signal file an off-peak choice also
    reports its saving against starting now."""
    now = now or datetime.now(timezone.utc)
    if now.tzinfo is None:
        raise ValueError("choose_start needs an aware `now`")
    now = now.astimezone(timezone.utc)  # all arithmetic in UTC (see local_instant)
    mode = mode or ("grid" if signal_file or _get(profile, "grid_signal") else "offpeak")
    if duration is None:
        duration = duration_of(_get(profile, "time_limit"))
    if duration <= timedelta(0):
        raise ConfigError(f"the planned duration {duration} is not > 0")
    signal_file = signal_file or _get(profile, "grid_signal")
    zone = profile_zone(profile)
    choice = _choose(profile, duration, now, signal_file, mode, zone)
    return StartChoice(**{**choice.__dict__, "timezone": zone.key})


def _choose(profile: Any, duration: timedelta, now: datetime, signal_file: Any, mode: str, zone: ZoneInfo) -> StartChoice:
    if mode == "now":
        return StartChoice("now", now, why="launch.start=now")
    if mode == "offpeak":
        begin = next_offpeak(profile, now)
        choice = StartChoice("offpeak", begin, why=f"off-peak hours {', '.join(_get(profile, 'offpeak'))} {zone.key}")
        if signal_file:
            signal = read_grid_signal(signal_file, zone)
            if signal.start <= now and begin + duration <= signal.end:
                from_now, from_begin = signal.mean(now, duration), signal.mean(begin, duration)
                return StartChoice("offpeak", begin, 1 - from_begin / from_now if from_now else None, from_now,
                                   from_begin, choice.why)
        return choice
    if mode == "grid":
        if not signal_file:
            raise ConfigError(f"launch.start=grid but cluster '{_get(profile, 'name')}' has no grid signal; set "
                              f"cluster.grid_signal=FILE (an hourly CSV, see README) or use launch.start=offpeak")
        signal = read_grid_signal(signal_file, zone)
        begin, from_begin, from_now = best_grid_start(signal, duration, now)
        saving = 1 - from_begin / from_now if from_now else None
        return StartChoice("grid", begin, saving, from_now, from_begin,
                           f"lowest mean grid signal over {duration} in {signal_file}")
    raise ConfigError(f"launch.start '{mode}' is not valid; valid: now, offpeak, grid")
