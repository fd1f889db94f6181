"""The facility's tracks on real Slurm accounting: slurm/local_cluster.sh runs MariaDB + slurmdbd next to slurmctld and
two slurmd. `aift cluster accounts` makes the tracks (fair-share 50/25/25) and projects (sub-accounts), jobs charged to
the projects are seen by sacct, sshare shows the shares, `aift usage` counts them per track with the regional share
against its 25 %, and launch.start=offpeak queues a job that waits for its begin time. Short `sbatch --wrap` jobs;
skipped, with the reason, when no such cluster answers."""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from aifactory_train.errors import ConfigError
from conftest import aift, assert_one_line_naming
from test_slurm import REASON, SLURM_CONF, job_state

ACCOUNTING = None
if REASON is None:
    result = subprocess.run(["sacctmgr", "-n", "-P", "show", "cluster", "format=Cluster"], capture_output=True,
                            text=True, env={**os.environ, "SLURM_CONF": SLURM_CONF}, timeout=30)
    if result.returncode != 0 or not result.stdout.strip():
        ACCOUNTING = f"the local cluster has no accounting (sacctmgr: {result.stderr.strip()[-300:]})"
pytestmark = pytest.mark.skipif(REASON is not None or ACCOUNTING is not None, reason=REASON or ACCOUNTING or "")

TRACK_ACCOUNTS = {"euro_hpc": "aif-eurohpc", "national": "aif-national", "regional": "aif-regional"}
PROJECTS = {"eu-notes": "euro_hpc", "nl-crops": "national", "rg-plastics": "regional"}


@pytest.fixture(scope="module")
def slurm_conf():
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = SLURM_CONF  # the in-process sacctmgr/sacct/sbatch calls of the functions under test
    yield SLURM_CONF
    if old is None:
        del os.environ["SLURM_CONF"]
    else:
        os.environ["SLURM_CONF"] = old


@pytest.fixture(scope="module")
def profile(slurm_conf):
    from aifactory_train.launch.accounts import apply_accounts, load_profile

    profile = load_profile(["cluster=local_slurm"])
    apply_accounts(profile)
    assert apply_accounts(profile) == []  # a second run finds nothing to do
    return profile


def sbatch(account: str, *args: str) -> str:
    result = subprocess.run(["sbatch", "--parsable", "-A", account, "-c", "1", "-J", "acct-test", *args,
                             "--wrap", "sleep 2"], capture_output=True, text=True, cwd="/tmp")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def sacct_state(job: str) -> dict[str, str]:
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job, "--format=JobIDRaw,Account,State,AllocCPUS"],
                         capture_output=True, text=True).stdout
    return dict(zip(["job", "account", "state", "cpus"], (out.splitlines() or [""])[0].split("|")))


def test_tracks_projects_shares_sacct_and_aift_usage(profile, tmp_path):
    started = datetime.now(timezone.utc) - timedelta(minutes=10)  # wide: sacct's clock and ours may differ a little
    # sshare: the three tracks with their fair-share under root, each project under its track
    rows = [line.split("|") for line in subprocess.run(["sshare", "-a", "-n", "-P", "-o", "Account,User,RawShares"],
                                                       capture_output=True, text=True, check=True).stdout.splitlines()]
    shares = {account.strip(): raw for account, user, raw in rows if not user}
    assert {shares[a] for a in TRACK_ACCOUNTS.values()} == {"50", "25"} and shares["aif-eurohpc"] == "50"
    assert shares["aif-national"] == shares["aif-regional"] == "25"
    tree = subprocess.run(["sacctmgr", "-n", "-P", "show", "assoc", "format=Account,ParentName,User"],
                          capture_output=True, text=True, check=True).stdout.splitlines()
    for project, track in PROJECTS.items():
        assert f"{project}|{TRACK_ACCOUNTS[track]}|" in tree and f"{project}||root" in tree

    # one job per project, a second regional one: regional has 2 of the 4 jobs' CPU-hours
    jobs = {sbatch("eu-notes"): "euro_hpc", sbatch("nl-crops"): "national", sbatch("rg-plastics"): "regional",
            sbatch("rg-plastics"): "regional"}
    deadline = time.time() + 300
    while time.time() < deadline and not all(sacct_state(j).get("state") == "COMPLETED" for j in jobs):
        time.sleep(1)
    states = {job: sacct_state(job) for job in jobs}
    assert all(s["state"] == "COMPLETED" for s in states.values()), states  # sacct sees them, finished
    assert {s["account"] for s in states.values()} == set(PROJECTS)

    from aifactory_train.launch.usage_report import build_report, sacct_jobs

    until = datetime.now(timezone.utc) + timedelta(minutes=1)
    for _ in range(30):  # sacct -S/-E has (rarely) missed a job that sacct -j already showed finished
        found = sacct_jobs(started, until)
        mine = [job for job in found if job.job_id in jobs]  # other tests' jobs share the cluster
        if len(mine) == len(jobs):
            break
        time.sleep(1)
    assert sorted(j.job_id for j in mine) == sorted(jobs), (sorted(jobs), started, until, [j.job_id for j in found][-8:])
    report = build_report(profile, mine, {}, started, until)
    per_track = {track: t["jobs"] for track, t in report["tracks"].items()}
    assert per_track == {"euro_hpc": 1, "national": 1, "regional": 2}
    hours = {job.job_id: job.cpus * job.hours_in(started, until, until) for job in mine}
    regional = sum(h for j, h in hours.items() if jobs[j] == "regional") / sum(hours.values())
    assert report["regional"] == {"share": pytest.approx(regional), "target": 0.25}
    assert all(row["kwh_slurm"] is None for row in report["rows"])  # no energy plugin in a VM: the ledger is the source

    # the command: the same jobs in its JSON, and the chart
    chart = tmp_path / "usage.png"
    result = aift("usage", "cluster=local_slurm", "--since", started.isoformat(), "--until", until.isoformat(),
                  "--format", "json", "--chart", str(chart), cwd=tmp_path, env={"SLURM_CONF": SLURM_CONF})
    assert result.returncode == 0, result.stderr[-2000:]
    shown = json.loads(result.stdout)
    listed = {j: row["track"] for row in shown["rows"] for j in row["job_ids"]}
    assert {j: listed.get(j) for j in jobs} == jobs
    assert set(shown["tracks"]) >= set(TRACK_ACCOUNTS) and shown["regional"]["target"] == 0.25
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # aift plan's allocation check reads what a track used this month from the same accounting: a number (the local
    # cluster has no GPUs: 0 GPU-hours), where without accounting it is None ("used unknown")
    from aifactory_train.launch.plan import used_gpu_hours

    assert used_gpu_hours("regional", profile) == pytest.approx(0.0)


def test_a_project_without_an_account_and_a_user_outside_it_are_refused_before_queueing(profile):
    from aifactory_train.launch.accounts import check_job_account

    ghost = {**profile, "allocation": "regional", "project": "rg-ghost",
             "projects": {**profile["projects"], "rg-ghost": {"track": "regional", "users": ["root"]}}}
    with pytest.raises(ConfigError) as err:
        check_job_account(ghost, "root")
    assert_one_line_naming(str(err.value), ["project 'rg-ghost'", "no Slurm account", "aift cluster accounts"])
    with pytest.raises(ConfigError) as err:
        check_job_account({**profile, "allocation": "regional", "project": "rg-plastics"}, "nobody")
    assert_one_line_naming(str(err.value), ["user 'nobody'", "project 'rg-plastics'", "cluster.projects.rg-plastics.users"])
    check_job_account({**profile, "allocation": "regional", "project": "rg-plastics"}, "root")  # this one is fine


def test_an_offpeak_job_is_pending_on_begintime_until_the_window(profile, tmp_path, capsys):
    """The job is queued with sbatch --begin at the next window's start: a window that opens in two hours."""
    from zoneinfo import ZoneInfo

    from aifactory_train.launch.slurm import launch

    opens = (datetime.now(ZoneInfo("Europe/Amsterdam")) + timedelta(hours=2)).replace(second=0, microsecond=0)
    window = f"{opens:%H:%M}-{opens + timedelta(hours=1):%H:%M}"
    run = tmp_path / "offpeak"
    launch(["cluster=local_slurm", "recipe=plastic_sorting", "trainer.accelerator=cpu", "tracking=none",
            "launch.start=offpeak", f"cluster.offpeak=['{window}']", "cluster.allocation=regional",
            "cluster.project=rg-plastics"], dry_run=False, job_name="offpeak", run_dir=str(run), data_check=False)
    out = capsys.readouterr().out
    job = next(line.split()[-1] for line in out.splitlines() if line.startswith("submitted job "))
    try:
        state = job_state(job)
        assert (state["JobState"], state["Reason"], state["Account"]) == ("PENDING", "BeginTime", "rg-plastics"), state
        # scontrol shows the begin (EligibleTime) in this machine's local time
        assert datetime.fromisoformat(state["EligibleTime"]).astimezone() == opens, state
        assert f"begins: {opens.isoformat(timespec='minutes')}" in out
    finally:
        subprocess.run(["scancel", job], check=False)
