"""`aift usage`: what each allocation track and project used over a period, from Slurm's accounting (sacct), joined
with the MLflow runs of the jobs (by Slurm job id) for their energy, data owners and exported models.

Per track and project: jobs, CPU-hours (allocated CPUs x run time), GPU-hours (allocated gres/gpu x run time), kWh
from the runs' own energy ledgers (<run>/energy/*.json, the counters the training read: aifactory_train/records/energy.py)
and, where the cluster measures it (an acct_gather_energy plugin), Slurm's ConsumedEnergy. Run time is clipped to the
period. Each track's share of the total (GPU-hours where any GPU was used, else CPU-hours) is set against its target
share from the profile's fair-share (cluster.shares: 50/25/25), the regional track's against its 25 %.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from aifactory_train.errors import AiftError, ConfigError

SACCT_FIELDS = ["JobIDRaw", "JobName", "Account", "User", "State", "Start", "End", "AllocCPUS", "AllocTRES",
                "ConsumedEnergyRaw"]
NO_TRACK = "(no track)"
REGIONAL = "regional"


@dataclass
class Job:
    job_id: str
    name: str
    account: str
    user: str
    state: str
    start: datetime | None
    end: datetime | None
    cpus: int
    gpus: int
    slurm_joules: float | None = None  # ConsumedEnergy, where the cluster measures it
    runs: list[dict[str, Any]] = field(default_factory=list)

    def hours_in(self, since: datetime, until: datetime, now: datetime) -> float:
        if self.start is None:
            return 0.0
        begin, end = max(self.start, since), min(self.end or now, until)
        return max((end - begin).total_seconds(), 0.0) / 3600


@dataclass
class Row:
    track: str
    project: str  # the project, or "-" for jobs charged to the track's own account
    account: str
    jobs: int = 0
    cpu_hours: float = 0.0
    gpu_hours: float = 0.0
    kwh_ledger: float = 0.0  # the runs' energy ledgers
    kwh_slurm: float | None = None  # Slurm's ConsumedEnergy (None: not measured by the cluster)
    job_ids: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    data_owners: list[str] = field(default_factory=list)
    exports: list[str] = field(default_factory=list)


def parse_time(text: str | None, default: datetime, key: str) -> datetime:
    """--since/--until: YYYY-MM-DD or an ISO 8601 time; without an offset it is this machine's local time."""
    if text is None:
        return default
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{key} {text!r} is not a date; give YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS][+HH:MM]") from None
    return (value if value.tzinfo else value.astimezone()).astimezone(timezone.utc)


def _sacct_time(text: str) -> datetime | None:
    """sacct's times are this machine's local time; Unknown/None for a job that has not started or ended."""
    if not text or text in ("Unknown", "None"):
        return None
    return datetime.fromisoformat(text).astimezone().astimezone(timezone.utc)


def _gpus(tres: str) -> int:
    for item in tres.split(","):
        name, _, count = item.partition("=")
        if name == "gres/gpu":
            return int(count)
    return 0


def sacct_jobs(since: datetime, until: datetime) -> list[Job]:
    """Every job (all users: -a) Slurm's accounting holds for the period, with its steps' energy."""
    sacct = shutil.which("sacct")
    if sacct is None:
        raise AiftError("sacct was not found on PATH: aift usage runs on a Slurm login or admin node")
    local = lambda t: t.astimezone().replace(tzinfo=None).isoformat(timespec="seconds")  # noqa: E731
    result = subprocess.run([sacct, "-a", "-n", "-P", "--noconvert", f"--format={','.join(SACCT_FIELDS)}",
                             "-S", local(since), "-E", local(until)], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        why = (result.stderr.strip() or result.stdout.strip()).splitlines()
        raise AiftError(f"sacct failed (is the cluster's accounting, slurmdbd, running?): {why[-1] if why else result.returncode}")
    jobs: dict[str, Job] = {}
    step_energy: dict[str, float] = {}
    for line in result.stdout.splitlines():
        values = dict(zip(SACCT_FIELDS, line.split("|")))
        job_id, _, step = values["JobIDRaw"].partition(".")
        energy = values.get("ConsumedEnergyRaw", "")
        joules = float(energy) if energy.replace(".", "", 1).isdigit() else None
        if step:
            if joules:
                step_energy[job_id] = max(step_energy.get(job_id, 0.0), joules)
            continue
        jobs[job_id] = Job(job_id, values["JobName"], values["Account"], values["User"], values["State"].split()[0],
                           _sacct_time(values["Start"]), _sacct_time(values["End"]), int(values["AllocCPUS"] or 0),
                           _gpus(values["AllocTRES"]), joules or None)
    for job_id, joules in step_energy.items():
        if job_id in jobs and not jobs[job_id].slurm_joules:
            jobs[job_id].slurm_joules = joules
    return list(jobs.values())


def mlflow_runs_by_job(uri: str) -> dict[str, list[dict[str, Any]]]:
    """The MLflow runs of Slurm jobs (tag aift.usage.slurm_job: the job id slurmctld confirmed to the run), all
    experiments, with their run folder, data owner and exports."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    from aifactory_train.records.tracking import _all_runs, check_tracking_uri

    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise ConfigError(f"--tracking-uri {uri}: there is no MLflow store at that path")
    check_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    found: dict[str, list[dict[str, Any]]] = {}
    if not experiments:
        return found
    for run in _all_runs(client, experiments, "tags.`aift.usage.slurm_job` != ''"):
        tags = run.data.tags
        found.setdefault(tags["aift.usage.slurm_job"], []).append({
            "run_id": run.info.run_id, "output_dir": tags.get("aift.output_dir"),
            "data_owner": tags.get("aift.data.owner"),
            "exports": sorted(v for k, v in tags.items() if k.startswith("aift.export.")),
            "registered": [f"{v.name} version {v.version}" for v in
                           client.search_model_versions(f"run_id = '{run.info.run_id}'")],
        })
    return found


def ledger_joules(output_dir: str | None, job_id: str) -> float:
    """The joules the run's energy ledgers counted in Slurm job ``job_id`` (every start of a requeued job)."""
    from aifactory_train.records.energy import ENERGY_DIR

    if not output_dir:
        return 0.0
    total = 0.0
    for path in sorted((Path(output_dir) / ENERGY_DIR).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if str(record.get("slurm_job_id")) == job_id and isinstance(record.get("joules"), (int, float)):
            total += record["joules"]
    return total


def account_map(profile: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Slurm account -> (track, project)."""
    mapping = {account: (track, "-") for track, account in (profile.get("accounts") or {}).items() if account}
    for name, project in (profile.get("projects") or {}).items():
        mapping[name] = (project["track"], name)
    return mapping


def build_report(profile: dict[str, Any], jobs: list[Job], runs_by_job: dict[str, list[dict[str, Any]]],
                 since: datetime, until: datetime, now: datetime | None = None) -> dict[str, Any]:
    from aifactory_train.records.energy import JOULES_PER_KWH

    now = now or datetime.now(timezone.utc)
    mapping = account_map(profile)
    rows: dict[tuple[str, str, str], Row] = {}
    for job in jobs:
        track, project = mapping.get(job.account, (NO_TRACK, "-"))
        row = rows.setdefault((track, project, job.account), Row(track, project, job.account))
        hours = job.hours_in(since, until, now)
        row.jobs += 1
        row.job_ids.append(job.job_id)
        row.cpu_hours += job.cpus * hours
        row.gpu_hours += job.gpus * hours
        if job.slurm_joules:
            row.kwh_slurm = (row.kwh_slurm or 0.0) + job.slurm_joules / JOULES_PER_KWH
        for run in runs_by_job.get(job.job_id, []):
            row.runs.append(run["run_id"])
            row.kwh_ledger += ledger_joules(run.get("output_dir"), job.job_id) / JOULES_PER_KWH
            if run.get("data_owner") and run["data_owner"] not in row.data_owners:
                row.data_owners.append(run["data_owner"])
            row.exports.extend([*run.get("exports", []), *run.get("registered", [])])
    ordered = sorted(rows.values(), key=lambda r: (r.track == NO_TRACK, r.track, r.project, r.account))
    shares = profile.get("shares") or {}
    total_share = sum(shares.values())
    basis = "gpu_hours" if any(r.gpu_hours for r in ordered) else "cpu_hours"
    used_total = sum(getattr(r, basis) for r in ordered)
    tracks = {}
    for track in [*(t for t in (profile.get("accounts") or {}) if t in shares), NO_TRACK]:
        mine = [r for r in ordered if r.track == track]
        if track == NO_TRACK and not mine:
            continue
        used = sum(getattr(r, basis) for r in mine)
        tracks[track] = {
            "jobs": sum(r.jobs for r in mine), "cpu_hours": sum(r.cpu_hours for r in mine),
            "gpu_hours": sum(r.gpu_hours for r in mine), "kwh_ledger": sum(r.kwh_ledger for r in mine),
            "kwh_slurm": sum(r.kwh_slurm for r in mine if r.kwh_slurm is not None) if any(r.kwh_slurm is not None for r in mine) else None,
            "share": used / used_total if used_total else 0.0,
            "target": shares[track] / total_share if track in shares and total_share else None,
        }
    return {"cluster": profile.get("name"), "since": since.isoformat(), "until": until.isoformat(), "share_basis": basis,
            "rows": [asdict(r) for r in ordered], "tracks": tracks,
            "regional": {"share": tracks.get(REGIONAL, {}).get("share", 0.0),
                         "target": tracks.get(REGIONAL, {}).get("target")}}


TABLE_COLUMNS = [("track", "track"), ("project", "project"), ("account", "account"), ("jobs", "jobs"),
                 ("cpu_hours", "CPU-h"), ("gpu_hours", "GPU-h"), ("kwh_ledger", "kWh (runs)"),
                 ("kwh_slurm", "kWh (Slurm)"), ("runs", "runs"), ("data_owners", "data owners"), ("exports", "exports")]


def _cell(value: Any, key: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6f}" if key.startswith("kwh") else f"{value:.3f}"
    if isinstance(value, list):
        return "; ".join(str(v) for v in value) or "-"
    return str(value)


def as_table(report: dict[str, Any]) -> str:
    lines = [f"usage of cluster {report['cluster']} from {report['since']} to {report['until']}"]
    grid = [[title for _, title in TABLE_COLUMNS]] + [[_cell(row[key], key) for key, _ in TABLE_COLUMNS]
                                                      for row in report["rows"]]
    widths = [max(len(r[i]) for r in grid) for i in range(len(TABLE_COLUMNS))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in grid]
    basis = "GPU-hours" if report["share_basis"] == "gpu_hours" else "CPU-hours"
    lines.append(f"per track (share of {basis} vs target):")
    for track, total in report["tracks"].items():
        target = f"{total['target']:.0%}" if total["target"] is not None else "-"
        lines.append(f"  {track:12s} jobs {total['jobs']:4d}  CPU-h {total['cpu_hours']:.3f}  GPU-h "
                     f"{total['gpu_hours']:.3f}  kWh {total['kwh_ledger']:.6f}  share {total['share']:.1%} "
                     f"(target {target})")
    regional = report["regional"]
    if regional["target"] is not None:
        verdict = "below" if regional["share"] < regional["target"] else "at or above"
        lines.append(f"regional share: {regional['share']:.1%} of {basis}, {verdict} its {regional['target']:.0%} target")
    return "\n".join(lines)


def as_csv(report: dict[str, Any]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([key for key, _ in TABLE_COLUMNS] + ["job_ids"])
    for row in report["rows"]:
        writer.writerow([_cell(row[key]) if isinstance(row[key], list) or row[key] is None else row[key]
                         for key, _ in TABLE_COLUMNS] + [" ".join(row["job_ids"])])
    return out.getvalue()


def write_chart(report: dict[str, Any], path: Path) -> Path:
    """Bars of each track's share of the period's hours next to its target share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tracks = list(report["tracks"])
    used = [report["tracks"][t]["share"] * 100 for t in tracks]
    target = [(report["tracks"][t]["target"] or 0) * 100 for t in tracks]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(len(tracks))
    ax.bar([x - 0.2 for x in xs], used, width=0.4, label="used")
    ax.bar([x + 0.2 for x in xs], target, width=0.4, label="target (fair-share)", color="lightgray", edgecolor="gray")
    ax.set_xticks(list(xs), tracks)
    basis = "GPU-hours" if report["share_basis"] == "gpu_hours" else "CPU-hours"
    ax.set_ylabel(f"% of {basis}")
    ax.set_title(f"{report['cluster']}: {report['since'][:10]} to {report['until'][:10]}")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_usage(overrides: list[str], since: str | None, until: str | None, fmt: str, chart: str | None,
              tracking_uri: str | None) -> int:
    from aifactory_train.launch.accounts import load_profile

    profile = load_profile(overrides)
    now = datetime.now(timezone.utc)
    month_start = now.astimezone().replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    start = parse_time(since, month_start.astimezone(timezone.utc), "--since")
    end = parse_time(until, now, "--until")
    if end <= start:
        raise ConfigError(f"--until {end.isoformat()} is not after --since {start.isoformat()}")
    runs = mlflow_runs_by_job(tracking_uri) if tracking_uri else {}
    report = build_report(profile, sacct_jobs(start, end), runs, start, end, now)
    print(json.dumps(report, indent=2) if fmt == "json" else as_csv(report) if fmt == "csv" else as_table(report),
          end="" if fmt == "csv" else "\n")
    if chart:
        write_chart(report, Path(chart))
        if fmt == "table":
            print(f"wrote {chart}")
    return 0
