"""The data owner's usage terms (the data card's ``usage`` section): which purposes (recipes), users and Slurm
accounts may use the data, and until when. A use outside them is refused before anything is read, tracked or
queued; a term that cannot be read is an error, never a restriction silently dropped. Who, where and for which
recipe come from the operating system and the code that runs, never from a variable or a config key."""

from __future__ import annotations

import datetime
import json
import os
import pwd
import shutil
import socket
from pathlib import Path

import pytest
import yaml

from aifactory_train.errors import DataError
from aifactory_train.records.lineage import DATACARD_FILE, read_datacard, read_usage_terms
from conftest import aift

TODAY = datetime.date(2026, 11, 29)
OS_USER = pwd.getpwuid(os.getuid()).pw_name
HOST = socket.gethostname()


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
    ({"untill": "2027-01-01"}, "usage has unknown key(s) ['untill']; valid: recipes, users, accounts, hosts, until, tracking"),
    ({"until": "next summer"}, "usage.until must be a date (YYYY-MM-DD), not 'next summer'"),
    ({"users": []}, "usage.users must be a non-empty list of names, not []"),
    ({"accounts": {"a": 1}}, "usage.accounts must be a non-empty list of names"),
    (["crop_detection"], "usage must be a mapping of recipes, users, accounts, hosts, until, tracking"),
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
                  cwd=tmp_path, env=NOT_IN_A_JOB)
    assert result.returncode == 2 and "usage.hosts allows the data to be used on ['gcn*', 'tcn*'] only, not on " \
        f"'{HOST}'" in result.stderr

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


def test_a_use_inside_every_term_trains_and_records_what_was_checked(plastic_data, tmp_path):
    usage = {"recipes": ["plastic_sorting"], "users": [OS_USER], "hosts": [HOST],
             "until": (datetime.date.today() + datetime.timedelta(days=30)).isoformat()}
    data = restricted_copy(plastic_data, tmp_path / "terms", usage)
    result = aift("train", "recipe=plastic_sorting", "debug=smoke", f"data.root={data}", "tracking=none",
                  "run_test=false", "hydra.run.dir=run", cwd=tmp_path, env=NOT_IN_A_JOB)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dataset"]["datacard"]["usage"].startswith("recipes=plastic_sorting; users=")
    # what the terms were checked against, taken from the OS and the code that ran
    check = summary["usage_check"]
    assert (check["recipe"], check["user"], check["host"], check["account"]) == ("plastic_sorting", OS_USER, HOST, None)
    assert check["host_from"] == "the kernel's host name" and check["slurm_job"] is None
    assert [c["path"] for c in check["cards"]] == [str(data / DATACARD_FILE)] and check["terms_stated"]


def one_line_refusal(result, message: str) -> None:
    """Exit 2, one `error:` line holding ``message``, no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


TRAIN = ["train", "recipe=plastic_sorting", "debug=smoke", "tracking=none", "hydra.run.dir=run"]


def test_the_user_is_the_operating_systems_not_USER_or_LOGNAME(plastic_data, tmp_path):
    # getpass.getuser() reads $USER/$LOGNAME first: USER=alice passed `users: [alice]`
    data = restricted_copy(plastic_data, tmp_path / "alice", {"users": ["alice"]})
    result = aift(*TRAIN, f"data.root={data}", cwd=tmp_path, env={"USER": "alice", "LOGNAME": "alice"})
    one_line_refusal(result, f"usage.users allows ['alice'], not user '{OS_USER}'")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_host_is_the_kernels_not_SLURMD_NODENAME_or_a_claimed_job(plastic_data, tmp_path):
    # SLURMD_NODENAME=gcn1 passed `hosts: [gcn*]` on a login node; a made-up job id proves nothing either
    data = restricted_copy(plastic_data, tmp_path / "gcn", {"hosts": ["gcn*"]})
    env = {"SLURMD_NODENAME": "gcn1", "SLURM_JOB_ID": "4242", "SLURM_JOBID": "4242", "HOSTNAME": "gcn1"}
    result = aift(*TRAIN, f"data.root={data}", cwd=tmp_path, env=env)
    one_line_refusal(result, f"usage.hosts allows the data to be used on ['gcn*'] only, not on '{HOST}'")


def test_the_account_is_slurmctlds_for_a_verified_job_not_SLURM_JOB_ACCOUNT(plastic_data, tmp_path):
    # SLURM_JOB_ACCOUNT=aif-regional passed `accounts: [aif-regional]` outside any job
    data = restricted_copy(plastic_data, tmp_path / "regional", {"accounts": ["aif-regional"]})
    env = {"SLURM_JOB_ACCOUNT": "aif-regional", "SLURM_JOB_ID": "4242"}
    result = aift(*TRAIN, f"data.root={data}", cwd=tmp_path, env=env)
    one_line_refusal(result, "usage.accounts allows the jobs of Slurm accounts ['aif-regional'], and this has no "
                             "Slurm account named")


def test_the_recipe_is_the_code_that_runs_not_recipe_name(plastic_data, tmp_path):
    # recipe.name=crop_detection on a plastic_sorting run passed terms that allow crop_detection only
    data = restricted_copy(plastic_data, tmp_path / "crops_only", {"recipes": ["crop_detection"]})
    result = aift(*TRAIN, f"data.root={data}", "recipe.name=crop_detection", cwd=tmp_path)
    one_line_refusal(result, "config key 'recipe.name': 'crop_detection' is not the recipe that runs: "
                             "recipe.module._target_ 'aifactory_train.recipes.plastic_sorting.module.")
    assert "valid: recipe.name=plastic_sorting" in result.stderr
    # also without terms: recipe.name names the experiment and the run folders
    result = aift(*TRAIN, f"data.root={plastic_data}", "recipe.name=crop_detection", cwd=tmp_path)
    one_line_refusal(result, "config key 'recipe.name': 'crop_detection' is not the recipe that runs")
    # nor may the module be swapped for something that is no registered recipe's code
    result = aift(*TRAIN, f"data.root={data}", "recipe.module._target_=builtins.dict", cwd=tmp_path)
    one_line_refusal(result, "config key 'recipe.module._target_': 'builtins.dict' is not the code of a registered "
                             "recipe")


def test_every_card_at_or_above_the_resolved_data_applies(plastic_data, tmp_path):
    # train read only data.root's own card: a subfolder with a card of its own, a symlink or a path with `..`
    # left the terms of the card above behind
    hospital = tmp_path / "hospital"
    data = restricted_copy(plastic_data, hospital / "subset", {"until": "2099-01-01"})  # its own card, lax
    (hospital / DATACARD_FILE).write_text(yaml.safe_dump({"owner": "UMCG", "usage": {"users": ["alice"]}}))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "link").symlink_to(data, target_is_directory=True)
    message = f"data card '{hospital / DATACARD_FILE}': usage.users allows ['alice'], not user '{OS_USER}'"
    for root in (data, tmp_path / "mine" / "link", tmp_path / "mine" / ".." / "hospital" / "subset"):
        one_line_refusal(aift(*TRAIN, f"data.root={root}", cwd=tmp_path), message)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_card_stating_no_consent_or_terms_is_warned_about_and_recorded(plastic_data, tmp_path):
    data = Path(shutil.copytree(plastic_data, tmp_path / "silent"))
    (data / DATACARD_FILE).write_text(yaml.safe_dump({"owner": "someone", "license": "CC0-1.0"}))
    # eval warns before it finds no checkpoint: the warning comes from the data check every command shares
    result = aift("eval", "recipe=plastic_sorting", "ckpt_path=none.ckpt", f"data.root={data}", "hydra.run.dir=eval",
                  cwd=tmp_path)
    output = result.stdout + result.stderr  # (Hydra's log handler prints to stdout)
    warnings = [line for line in output.splitlines() if "no consent and no usage terms" in line]
    assert len(warnings) == 1 and str(data / DATACARD_FILE) in warnings[0] and "WARNING" in warnings[0], output[-3000:]
    # the run's record of the data says so (summary.json's dataset.datacard, MLflow's aift.data.* tags)
    assert read_datacard(data)["terms"] == "none stated: no card states consent or usage terms"
    from aifactory_train.records.usage_terms import check_usage, terms_summary, usage_tags

    record = check_usage(data, {"name": "plastic_sorting",
                                "module": {"_target_": "aifactory_train.recipes.plastic_sorting.module.M"}})
    assert not record["consent_stated"] and not record["terms_stated"]
    assert usage_tags(record)["aift.usage.terms"] == terms_summary(record) == \
        "none stated: no card states consent or usage terms"


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


def small_notes(clinical_raw: Path, where: Path, usage) -> Path:
    """A few of the raw notes (deduce is slow on two shared cores), with the owner's terms on their card."""
    where.mkdir(parents=True)
    for split in ("train", "val", "test"):
        lines = (clinical_raw / f"{split}.jsonl").read_text().splitlines(keepends=True)
        (where / f"{split}.jsonl").write_text("".join(lines[:3]))
    content = yaml.safe_load((clinical_raw / DATACARD_FILE).read_text())
    (where / DATACARD_FILE).write_text(yaml.safe_dump({**content, "usage": usage}))
    return where


def test_deidentify_is_a_use_checked_like_training_and_its_output_carries_the_source_terms(clinical_raw, tmp_path):
    # `aift data deidentify` read data whose terms forbade it, and wrote a card without them
    forbidden = small_notes(clinical_raw, tmp_path / "forbidden", {"users": ["alice"]})
    result = aift("data", "deidentify", "recipe=clinical_notes", f"data.root={forbidden}", "--out", "clean",
                  cwd=tmp_path)
    one_line_refusal(result, f"data card '{forbidden / DATACARD_FILE}': usage.users allows ['alice'], not user "
                             f"'{OS_USER}'")
    assert not (tmp_path / "clean").exists()

    until = (datetime.date.today() + datetime.timedelta(days=30)).isoformat()
    usage = {"recipes": ["clinical_notes"], "users": [OS_USER], "until": until}
    allowed = small_notes(clinical_raw, tmp_path / "allowed", usage)
    result = aift("data", "deidentify", "recipe=clinical_notes", f"data.root={allowed}", "--out", "clean",
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    derived = yaml.safe_load((tmp_path / "clean" / DATACARD_FILE).read_text())["derived_from"]
    from aifactory_train.records.lineage import DatasetLineage, SplitLineage, digest_files

    source = DatasetLineage("clinical_notes", str(allowed), splits={
        s: SplitLineage(s, 0, digest_files(allowed, [f"{s}.jsonl"], [s])) for s in ("train", "val", "test")})
    assert derived["source"] == str(allowed) and derived["digest"] == source.digest  # the link to the source data
    assert derived["cards"][0]["path"] == str(allowed / DATACARD_FILE)
    assert derived["cards"][0]["card"]["usage"]["users"] == [OS_USER]  # structured, as the owner wrote them
    # ... and they apply to the derived data wherever it was written: past `until`, it is refused too
    from aifactory_train.records.usage_terms import check_usage

    recipe = {"name": "clinical_notes", "module": {"_target_": "aifactory_train.recipes.clinical_notes.module.M"}}
    with pytest.raises(DataError) as refused:
        check_usage(tmp_path / "clean", recipe, today=datetime.date(2100, 1, 1))
    assert (f"data card '{tmp_path / 'clean' / DATACARD_FILE}': derived_from '{allowed / DATACARD_FILE}' usage.until "
            f"is {until}") in str(refused.value)
    assert read_datacard(tmp_path / "clean")["usage"] == (f"recipes=clinical_notes; users={OS_USER}; until={until} "
                                                          f"(from {allowed / DATACARD_FILE})")


@pytest.mark.parametrize("text, message", [
    ("usage:\n  until: 2027-02-30\n", "usage.until must be a date (YYYY-MM-DD), not '2027-02-30'"),  # unquoted
    ("usage:\n  until: 2027-13-01\n", "usage.until must be a date (YYYY-MM-DD), not '2027-13-01'"),
])
def test_an_impossible_date_names_the_card_key_and_value(tmp_path, text, message):
    # PyYAML itself raised a bare ValueError ("day is out of range for month") for an unquoted impossible date
    (tmp_path / DATACARD_FILE).write_text(text)
    with pytest.raises(DataError) as refused:
        read_usage_terms(tmp_path)
    assert f"data card '{tmp_path / DATACARD_FILE}': {message}" in str(refused.value)


def test_a_card_that_is_not_utf8_names_the_card(tmp_path):
    (tmp_path / DATACARD_FILE).write_bytes(b"owner: \xff\xfe\n")
    with pytest.raises(DataError) as refused:
        read_usage_terms(tmp_path)
    assert f"data card '{tmp_path / DATACARD_FILE}' is not UTF-8" in str(refused.value)


@pytest.mark.parametrize("command", [["data", "digest"], ["data", "runs", "tracking.uri=sqlite:///mlflow.db"]])
def test_reading_data_to_digest_it_is_a_use_checked_like_training(command, plastic_data, tmp_path):
    data = restricted_copy(plastic_data, tmp_path / "detection_only", {"recipes": ["crop_detection"]})
    result = aift(*command, "recipe=plastic_sorting", f"data.root={data}", cwd=tmp_path)
    one_line_refusal(result, "usage.recipes allows ['crop_detection'], not recipe 'plastic_sorting'")
