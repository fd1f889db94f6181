"""The cluster profile's tracks and projects (aifactory_train/launch/accounts.py) and the usage report's arithmetic
(aifactory_train/launch/usage_report.py), without a cluster: the refusals of bad profiles, the sacctmgr commands that make
the accounts match, and the per-track shares. The same on the real accounting cluster: test_slurm_accounting.py."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from aifactory_train.errors import ConfigError, DataError
from aifactory_train.launch.accounts import Association, account_actions, job_account, load_profile
from aifactory_train.launch.usage_report import Job, build_report
from conftest import assert_one_line_naming

H100 = ["cluster=aifactory_h100"]
PROJECTS = ["cluster.projects={rg-plastics: {track: regional, users: [alice]}, eu-notes: {track: euro_hpc}}"]


@pytest.mark.parametrize("overrides, pieces", [
    (["cluster.allocation=eu"], ["cluster.allocation", "'eu'", "euro_hpc, national, regional"]),
    (["cluster.project=nope"], ["cluster.project 'nope'", "its projects: none", "aift cluster accounts cluster=aifactory_h100"]),
    ([*PROJECTS, "cluster.project=eu-notes"], ["cluster.allocation", "'regional'", "belongs to track euro_hpc"]),
    (["cluster.projects={x: {track: water}}"], ["cluster.projects.x.track", "'water'"]),
    (["cluster.shares={regional: 0}"], ["cluster.shares.regional", "0", ">= 1"]),
    (["cluster.offpeak=['22-07']", "cluster.allocation=regional"], []),  # checked when a start is chosen (test_start_window)
])
def test_bad_tracks_and_projects_are_one_line(overrides, pieces):
    if not pieces:
        load_profile([*H100, *overrides])
        return
    with pytest.raises(ConfigError) as err:
        load_profile([*H100, *overrides])
    assert_one_line_naming(str(err.value), pieces)


def test_a_job_is_charged_to_its_project_else_its_tracks_account():
    profile = load_profile([*H100, *PROJECTS])
    assert job_account(profile) == "aif-regional"
    assert job_account(load_profile([*H100, *PROJECTS, "cluster.project=rg-plastics"])) == "rg-plastics"


def test_account_actions_add_what_is_missing_set_what_differs_and_nothing_when_it_matches():
    profile = load_profile([*H100, *PROJECTS])
    first = account_actions(profile, [])
    assert ["add", "account", "aif-eurohpc", "parent=root", "fairshare=50"] == first[0][:5]
    assert ["add", "account", "rg-plastics", "parent=aif-regional", "fairshare=1"] == first[3][:5]
    assert first[-1] == ["add", "user", "alice", "account=rg-plastics"]
    matching = [Association("aif-eurohpc", "root", "", "50"), Association("aif-national", "root", "", "25"),
                Association("aif-regional", "root", "", "25"), Association("rg-plastics", "aif-regional", "", "1"),
                Association("eu-notes", "aif-eurohpc", "", "1"), Association("rg-plastics", "aif-regional", "alice", "1")]
    assert account_actions(profile, matching) == []
    changed = [Association("aif-national", "root", "", "40"), *matching[2:], matching[0]]
    assert account_actions(profile, changed) == [
        ["modify", "account", "where", "name=aif-national", "set", "fairshare=25"]]


def test_usage_report_shares_clip_to_the_period_and_use_gpu_hours_when_there_are_gpus():
    profile = load_profile([*H100, *PROJECTS])
    since = datetime(2026, 11, 1, tzinfo=timezone.utc)
    until = since + timedelta(days=1)
    hour = timedelta(hours=1)
    jobs = [
        Job("1", "a", "rg-plastics", "alice", "COMPLETED", since - hour, since + hour, 16, 4),  # 1 h in the period
        Job("2", "b", "aif-eurohpc", "bob", "COMPLETED", since + hour, since + 4 * hour, 16, 4),  # 3 h
        Job("3", "c", "aif-national", "eve", "COMPLETED", since + hour, since + 2 * hour, 64, 0),  # CPU only
        Job("4", "d", "aif-national", "eve", "PENDING", None, None, 16, 4),  # counted, no hours
    ]
    report = build_report(profile, jobs, {}, since, until, now=until)
    tracks = report["tracks"]
    assert report["share_basis"] == "gpu_hours"
    assert (tracks["regional"]["gpu_hours"], tracks["euro_hpc"]["gpu_hours"]) == (4.0, 12.0)
    assert tracks["national"]["jobs"] == 2 and tracks["national"]["cpu_hours"] == 64.0
    assert report["regional"] == {"share": 0.25, "target": 0.25}
    assert {(r["track"], r["project"]) for r in report["rows"]} == {("regional", "rg-plastics"), ("euro_hpc", "-"),
                                                                   ("national", "-")}


def test_a_bad_grid_file_stops_aift_launch_before_anything_is_queued(tmp_path):
    from aifactory_train.launch.slurm import launch

    grid = tmp_path / "grid.csv"
    grid.write_text("start,value\n2026-11-30T12:00:00,5\n")  # no time zone
    with pytest.raises(DataError) as err:
        launch(["cluster=local_slurm", "recipe=plastic_sorting", "trainer.accelerator=cpu", "tracking=none",
                "launch.start=grid", f"cluster.grid_signal={grid}"], dry_run=False, job_name=None,
               run_dir=str(tmp_path / "run"), data_check=False)
    assert_one_line_naming(str(err.value), [f"{grid}:2", "no time zone"])
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError) as err:
        launch(["cluster=local_slurm", "recipe=plastic_sorting", "launch.start=later"], dry_run=True, job_name=None,
               run_dir=str(tmp_path / "run"))
    assert_one_line_naming(str(err.value), ["launch.start", "'later'", "now, offpeak, grid"])
