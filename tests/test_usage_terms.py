"""The data owner's usage terms (the data card's ``usage`` section): which purposes (recipes), users and Slurm
accounts may use the data, and until when. A use outside them is refused before anything is read, tracked or
queued; a term that cannot be read is an error, never a restriction silently dropped."""

from __future__ import annotations

import datetime
import getpass
import json
import shutil
import socket
from pathlib import Path

import pytest
import yaml

from aifactory_train.errors import DataError
from aifactory_train.lineage import DATACARD_FILE, read_datacard, read_usage_terms
from conftest import aift

TODAY = datetime.date(2026, 11, 29)


def card(root: Path, usage) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / DATACARD_FILE).write_text(yaml.safe_dump({"owner": "Boerderij De Hoeve", "usage": usage}))
    return root / DATACARD_FILE


def test_terms_are_read_and_each_one_restricts(tmp_path):
    path = card(tmp_path, {"recipes": ["crop_detection"], "users": "alice", "accounts": ["aif-regional"],
                           "hosts": ["gcn*"], "until": datetime.date(2027, 6, 30)})
    terms = read_usage_terms(tmp_path)
    assert terms.users == ["alice"] and terms.until == datetime.date(2027, 6, 30)
    assert read_datacard(tmp_path)["usage"] == ("recipes=crop_detection; users=alice; accounts=aif-regional; "
                                                "hosts=gcn*; until=2027-06-30")
    terms.check("crop_detection", "alice", "aif-regional", TODAY, host="gcn12")  # inside every term
    terms.check("crop_detection", "alice", "aif-regional", datetime.date(2027, 6, 30))  # the last day still counts
    terms.check("crop_detection", "alice", "aif-regional", TODAY, host=None)  # a queued job: its node comes later
    refusals = [
        (("crop_detection", "alice", "aif-regional", datetime.date(2027, 7, 1)),
         "usage.until is 2027-06-30: the owner's terms for this data ended on that day (today is 2027-07-01)"),
        (("plastic_sorting", "alice", "aif-regional", TODAY),
         "usage.recipes allows ['crop_detection'], not recipe 'plastic_sorting'"),
        (("crop_detection", "mallory", "aif-regional", TODAY), "usage.users allows ['alice'], not user 'mallory'"),
        (("crop_detection", "alice", "aif-national", TODAY),
         "usage.accounts allows the jobs of Slurm accounts ['aif-regional'], and this has account 'aif-national'"),
        (("crop_detection", "alice", None, TODAY), "and this has no Slurm account named"),
        (("crop_detection", "alice", "aif-regional", TODAY, "laptop-7"),
         "usage.hosts allows the data to be used on ['gcn*'] only, not on 'laptop-7'"),
    ]
    for use, message in refusals:
        with pytest.raises(DataError) as refused:
            terms.check(*use[:4], host=use[4] if len(use) > 4 else "gcn12")
        assert f"data card '{path}': " in str(refused.value) and message in str(refused.value)


def test_no_card_or_no_usage_section_restricts_nothing(tmp_path):
    assert read_usage_terms(tmp_path) is None
    (tmp_path / DATACARD_FILE).write_text("owner: someone\n")
    assert read_usage_terms(tmp_path) is None and "usage" not in read_datacard(tmp_path)
    card(tmp_path, {"until": "2027-01-31"})  # a quoted date is a date too
    assert read_usage_terms(tmp_path).until == datetime.date(2027, 1, 31)


@pytest.mark.parametrize("usage, message", [
    ({"untill": "2027-01-01"}, "usage has unknown key(s) ['untill']; valid: recipes, users, accounts, hosts, until"),
    ({"until": "next summer"}, "usage.until must be a date (YYYY-MM-DD), not 'next summer'"),
    ({"users": []}, "usage.users must be a non-empty list of names, not []"),
    ({"accounts": {"a": 1}}, "usage.accounts must be a non-empty list of names"),
    (["crop_detection"], "usage must be a mapping of recipes, users, accounts, hosts, until"),
])
def test_a_term_that_cannot_be_read_is_an_error_not_a_lifted_restriction(tmp_path, usage, message):
    path = card(tmp_path, usage)
    with pytest.raises(DataError) as refused:
        read_usage_terms(tmp_path)
    assert f"data card '{path}': {message}" in str(refused.value)


NOT_IN_A_JOB = {"SLURM_JOB_ACCOUNT": ""}  # also when the tests themselves run inside a Slurm job


def restricted_copy(plastic_data: Path, where: Path, usage) -> Path:
    data = Path(shutil.copytree(plastic_data, where))
    card_file = data / DATACARD_FILE
    content = yaml.safe_load(card_file.read_text())
    card_file.write_text(yaml.safe_dump({**content, "usage": usage}))
    return data


def test_training_outside_the_terms_is_refused_before_anything_is_written(plastic_data, tmp_path):
    elsewhere = restricted_copy(plastic_data, tmp_path / "elsewhere", {"hosts": ["gcn*", "tcn*"]})
    result = aift("train", "recipe=plastic_sorting", "debug=smoke", f"data.root={elsewhere}", "hydra.run.dir=run",
                  cwd=tmp_path, env={**NOT_IN_A_JOB, "SLURMD_NODENAME": "laptop-7"})
    assert result.returncode == 2 and "usage.hosts allows the data to be used on ['gcn*', 'tcn*'] only, not on " \
        "'laptop-7'" in result.stderr

    expired = restricted_copy(plastic_data, tmp_path / "expired", {"until": "2020-12-31"})
    result = aift("train", "recipe=plastic_sorting", "debug=smoke", f"data.root={expired}", "hydra.run.dir=run",
                  cwd=tmp_path, env=NOT_IN_A_JOB)
    assert result.returncode == 2
    assert f"data card '{expired / DATACARD_FILE}': usage.until is 2020-12-31" in result.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "run" / "checkpoints").exists()

    other_purpose = restricted_copy(plastic_data, tmp_path / "purpose", {"recipes": ["crop_detection"]})
    result = aift("eval", "recipe=plastic_sorting", "ckpt_path=none.ckpt", f"data.root={other_purpose}",
                  "hydra.run.dir=eval", cwd=tmp_path, env=NOT_IN_A_JOB)
    assert result.returncode == 2 and "not recipe 'plastic_sorting'" in result.stderr  # scoring is a use too


def test_a_job_of_a_listed_account_and_user_trains_and_records_the_terms(plastic_data, tmp_path):
    usage = {"recipes": ["plastic_sorting"], "users": [getpass.getuser()], "accounts": ["aif-regional"],
             "hosts": [socket.gethostname()], "until": (datetime.date.today() + datetime.timedelta(days=30)).isoformat()}
    data = restricted_copy(plastic_data, tmp_path / "terms", usage)
    args = ["train", "recipe=plastic_sorting", "debug=smoke", f"data.root={data}", "tracking=none",
            "run_test=false", "hydra.run.dir=run"]
    outside = aift(*args, cwd=tmp_path, env=NOT_IN_A_JOB)  # on a login node, not in a job
    assert outside.returncode == 2 and "and this has no Slurm account named" in outside.stderr
    inside = aift(*args, cwd=tmp_path, env={"SLURM_JOB_ACCOUNT": "aif-regional"})
    assert inside.returncode == 0, inside.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dataset"]["datacard"]["usage"].startswith("recipes=plastic_sorting; users=")


def test_launch_checks_the_terms_against_the_account_the_job_is_charged_to(plastic_data, tmp_path):
    # hosts: a queued job's node is not known yet; it is checked when the job starts
    data = restricted_copy(plastic_data, tmp_path / "regional", {"accounts": ["aif-regional"], "hosts": ["gcn*"]})
    no_sbatch = {"PATH": str(tmp_path / "no-such-bin")}
    job = ["launch", "recipe=plastic_sorting", "cluster=aifactory_h100", "strategy=ddp", f"data.root={data}"]
    result = aift(*job, "cluster.allocation=national", cwd=tmp_path, env=no_sbatch)
    assert result.returncode == 2 and "and this has account 'aif-national'" in result.stderr
    assert "sbatch" not in result.stderr and not (tmp_path / "outputs").exists()  # refused before queueing
    result = aift(*job, "cluster.allocation=regional", cwd=tmp_path, env=no_sbatch)
    assert result.returncode == 2 and "sbatch was not found" in result.stderr  # allowed: on to the queue
