"""`aift launch` against a real Slurm cluster: slurm/local_cluster.sh (started by .ci/run, or by hand) runs munge,
slurmctld and two slurmd daemons (two emulated nodes on this machine). These tests submit real jobs and wait for them.
They are skipped, with the reason, only when no such cluster answers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import aift

SLURM_CONF = os.environ.get("SLURM_CONF") or "/tmp/aift-slurm/slurm.conf"


def _cluster_reason() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch is not installed (bash slurm/local_cluster.sh start installs and starts a local cluster)"
    if not Path(SLURM_CONF).is_file():
        return f"no Slurm config at {SLURM_CONF} (start one: bash slurm/local_cluster.sh start)"
    result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                            env={**os.environ, "SLURM_CONF": SLURM_CONF}, timeout=20)
    if result.returncode != 0 or "idle" not in result.stdout and "mix" not in result.stdout:
        return f"the local Slurm cluster does not answer (sinfo: {result.stderr.strip() or result.stdout.strip()})"
    return None


REASON = _cluster_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


@pytest.fixture(scope="module", autouse=True)
def track_accounts():
    """The local_slurm profile's tracks and projects as Slurm accounts (the cluster enforces associations: a job's
    account must exist, with the user in it), made as a facility admin makes them: aift cluster accounts."""
    if REASON is not None:
        return
    from aifactory_train.launch.accounts import apply_accounts, load_profile

    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = SLURM_CONF
    try:
        apply_accounts(load_profile(["cluster=local_slurm"]))
    finally:
        os.environ.pop("SLURM_CONF") if old is None else os.environ.__setitem__("SLURM_CONF", old)


def slurm_env(tmp_path: Path) -> dict[str, str]:
    # the job runs `aift` from PATH (sbatch exports the submitting environment), so put this environment's first
    return {"SLURM_CONF": SLURM_CONF, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}


def job_id_of(stdout: str) -> str:
    line = next(line for line in stdout.splitlines() if line.startswith("submitted job "))
    return line.split()[-1]


def job_state(job_id: str) -> dict[str, str]:
    result = subprocess.run(["scontrol", "show", "job", job_id, "-o"], capture_output=True, text=True,
                            env={**os.environ, "SLURM_CONF": SLURM_CONF})
    fields = dict(part.split("=", 1) for part in result.stdout.split() if "=" in part)
    return fields


def wait_for(job_id: str, timeout: float = 900) -> dict[str, str]:
    # a failsafe, not a speed check: in CI the other pytest worker shares the 2 cores, and a 2-process DeepSpeed job
    # that takes ~2 min alone took 6.9 min there
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_state(job_id)
        if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1)
    subprocess.run(["scancel", job_id], env={**os.environ, "SLURM_CONF": SLURM_CONF})
    raise AssertionError(f"job {job_id} did not finish in {timeout} s: {job_state(job_id)}")


def logs(run: Path) -> str:
    return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted((run / "slurm").glob("*")))


def failure(state: dict[str, str], run: Path) -> str:
    # a string, so pytest shows all of it (a tuple's repr is cut to a few hundred characters, traceback and all)
    return f"job {state.get('JobId')} ended {state.get('JobState')} (exit {state.get('ExitCode')}); logs:\n{logs(run)}"


def launch(tmp_path: Path, *overrides: str, name: str) -> tuple[str, Path]:
    run = tmp_path / name
    result = aift("launch", "cluster=local_slurm", "trainer.accelerator=cpu", *overrides, "--run-dir", str(run),
                  cwd=tmp_path, env=slurm_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"run folder: {run}" in result.stdout
    return job_id_of(result.stdout), run


SMOKE = ["recipe=clinical_notes", "debug=smoke", "run_test=false", "trainer.limit_val_batches=1",
         "recipe.module.rouge_max_batches=0", "tracking.experiment=slurm"]


def energy_records(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run / "energy").glob("*.json"))]


def test_two_task_ddp_job_on_one_node_and_two_node_job(clinical_data, powercap, tmp_path, monkeypatch):
    # the CPU energy counter (powercap files a test thread keeps counting): each node's first rank reads its node's
    energy = ["energy.meter=rapl", f"energy.powercap_dir={powercap.root}", "energy.sample_every_s=1"]
    # charged to a regional project: aift usage links its sacct row to its MLflow run and energy ledger (below)
    one_node, run_a = launch(tmp_path, *SMOKE, *energy, f"data.root={clinical_data}", "strategy=ddp",
                             "trainer.devices=2", "cluster.allocation=regional", "cluster.project=rg-plastics",
                             name="one_node")
    two_nodes, run_b = launch(tmp_path, *SMOKE, *energy, f"data.root={clinical_data}", "strategy=ddp",
                              "trainer.devices=1", "trainer.num_nodes=2", name="two_nodes")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    for job, run, nodes in ((one_node, run_a, 1), (two_nodes, run_b, 2)):
        state = wait_for(job)
        assert state["JobState"] == "COMPLETED", failure(state, run)
        assert state["NumNodes"] == str(nodes)
        summary = json.loads((run / "summary.json").read_text())
        assert summary["num_processes"] == 2 and summary["global_step"] == 4
        mlflow_run = client.get_run(summary["mlflow_run_id"])
        assert mlflow_run.info.status == "FINISHED" and "train/loss" in mlflow_run.data.metrics
        records = energy_records(run)
        assert sorted(r["rank"] for r in records) == list(range(nodes))  # one reader per node: ranks 0 (and 1)
        assert len({r["host"] for r in records}) == nodes and summary["energy"]["devices"] == nodes
        assert summary["energy"]["joules"] == pytest.approx(sum(r["joules"] for r in records), abs=1e-3)
    experiment = client.get_experiment_by_name("slurm").experiment_id
    assert len(client.search_runs([experiment])) == 2  # one MLflow run per job, whatever the rank count
    # aift usage's join: sacct's row of the job -> its MLflow run (by the job id slurmctld confirmed to the run) ->
    # the run's energy ledger (kWh) and data owner
    from datetime import datetime, timedelta, timezone

    from aifactory_train.launch.accounts import load_profile
    from aifactory_train.launch.usage_report import build_report, mlflow_runs_by_job, sacct_jobs

    monkeypatch.setenv("SLURM_CONF", SLURM_CONF)  # for the in-process sacct
    now = datetime.now(timezone.utc)
    since = now - timedelta(hours=2)
    jobs = [job for job in sacct_jobs(since, now + timedelta(minutes=1)) if job.job_id == one_node]
    assert [job.account for job in jobs] == ["rg-plastics"]
    report = build_report(load_profile(["cluster=local_slurm"]), jobs,
                          mlflow_runs_by_job(f"sqlite:///{tmp_path}/mlflow.db"), since, now + timedelta(minutes=1))
    [row] = report["rows"]
    summary = json.loads((run_a / "summary.json").read_text())
    assert (row["track"], row["project"], row["runs"]) == ("regional", "rg-plastics", [summary["mlflow_run_id"]])
    # the same ledger, read by aift usage after the job ended and by the summary when rank 0 finished (a rank's last
    # counter sample may be written in between)
    assert row["kwh_ledger"] == pytest.approx(summary["energy"]["joules"] / 3.6e6, rel=1e-3)
    assert row["data_owners"] == ["AI Factory Groningen (generated demo data)"]


def test_deepspeed_zero3_job_on_two_cpu_processes(clinical_data, tmp_path):
    job, run = launch(tmp_path, *SMOKE, f"data.root={clinical_data}", "strategy=deepspeed_zero3",
                      "strategy.cpu_smoke=true", "strategy.stage3_param_persistence_threshold=0", "trainer.devices=2",
                      name="zero3")
    state = wait_for(job)
    assert state["JobState"] == "COMPLETED", failure(state, run)
    assert json.loads((run / "deepspeed_config.json").read_text())["zero_optimization"]["stage"] == 3
    assert (run / "checkpoints" / "last.ckpt" / "checkpoint").is_dir()


def test_usr1_requeues_the_job_which_resumes_and_finishes_at_the_planned_step(clinical_data, powercap, tmp_path):
    job, run = launch(tmp_path, "recipe=clinical_notes", f"data.root={clinical_data}", "trainer.max_epochs=8",
                      "run_test=false", "trainer.limit_val_batches=1", "recipe.module.rouge_max_batches=0",
                      "trainer.enable_progress_bar=false", "energy.meter=rapl",
                      f"energy.powercap_dir={powercap.root}", "energy.sample_every_s=1", name="requeue")
    deadline = time.time() + 600
    while not list((run / "checkpoints").glob("*.ckpt")) and time.time() < deadline:  # training is under way
        assert job_state(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), logs(run)
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", job], check=True, env={**os.environ, "SLURM_CONF": SLURM_CONF})
    state = wait_for(job)
    assert state["JobState"] == "COMPLETED", failure(state, run)
    assert int(state["Restarts"]) >= 1, state  # it was requeued, not finished in one go
    train_log = (run / "train.log").read_text()
    assert "hpc_ckpt" in train_log and "resuming from" in train_log
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 8 * 15 and summary["epochs"] == 8  # the planned count, not more, not less
    runs = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").search_runs(
        [MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").get_experiment_by_name("clinical_notes").experiment_id])
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]]  # the requeued job logged into the same run
    # the energy of every start of the job is in the run's total: the one that was requeued and the one that finished
    records = energy_records(run)
    assert len(records) == int(state["Restarts"]) + 1 and {r["slurm_job_id"] for r in records} == {job}
    assert all(r["joules"] > 0 for r in records) and summary["energy"]["segments"] == len(records)
    assert summary["energy"]["joules"] == pytest.approx(sum(r["joules"] for r in records), abs=1e-3)


def test_multirun_submits_one_job_and_one_mlflow_run_per_point(clinical_data, tmp_path):
    result = aift("launch", "-m", "cluster=local_slurm", "trainer.accelerator=cpu", *SMOKE, f"data.root={clinical_data}",
                  "tracking.experiment=sweep", "seed=1,2", "--run-dir", str(tmp_path / "sweep"),
                  cwd=tmp_path, env=slurm_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = [line.split()[-1] for line in result.stdout.splitlines() if line.startswith("submitted job ")]
    assert len(set(jobs)) == 2
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    seeds = set()
    for index, job in enumerate(jobs):
        run = tmp_path / "sweep" / str(index)
        state = wait_for(job)
        assert state["JobState"] == "COMPLETED", failure(state, run)
        summary = json.loads((run / "summary.json").read_text())
        seeds.add(client.get_run(summary["mlflow_run_id"]).data.params["seed"])
    assert seeds == {"1", "2"}
    assert len(client.search_runs([client.get_experiment_by_name("sweep").experiment_id])) == 2


def test_an_unusable_tracking_store_is_refused_before_any_job_is_queued(clinical_data, tmp_path):
    result = aift("launch", "-m", "cluster=local_slurm", "trainer.accelerator=cpu", *SMOKE, f"data.root={clinical_data}",
                  "seed=1,2", f"tracking.uri=sqlite:///{tmp_path}/no-such-folder/mlflow.db",
                  "--run-dir", str(tmp_path / "sweep"), cwd=tmp_path, env=slurm_env(tmp_path))
    assert result.returncode == 2 and "no-such-folder' does not exist" in result.stderr, result.stderr[-2000:]
    assert "submitted job" not in result.stdout and not (tmp_path / "sweep").exists()


def test_data_the_owner_keeps_to_the_clusters_nodes_and_an_account_trains_in_a_job_and_is_refused_elsewhere(
        clinical_data, tmp_path):
    """The data card's usage: these notes may be used on the cluster's nodes (node1, node2) only, by jobs of the
    account aif-regional. `aift launch` queues the job under that account (its node is not known yet); the job
    checks again where it starts, with the node and account slurmctld confirms for it, and trains. The same command
    on this machine outside a job is refused, whatever Slurm variables it sets: SLURMD_NODENAME, SLURM_JOB_ID and
    SLURM_JOB_ACCOUNT of that very job say nothing about this process."""
    import socket

    import yaml

    def copy_with(name: str, usage: dict) -> Path:
        data = Path(shutil.copytree(clinical_data, tmp_path / name))
        card = yaml.safe_load((data / "datacard.yaml").read_text())
        (data / "datacard.yaml").write_text(yaml.safe_dump({**card, "usage": usage}))
        return data

    data = copy_with("notes", {"hosts": ["node*"], "accounts": ["aif-regional"]})
    # the track's own account (root is in it: cluster.accounts.regional, added below as a facility admin would)
    subprocess.run(["sacctmgr", "-i", "add", "user", "root", "account=aif-regional"], capture_output=True,
                   env={**os.environ, "SLURM_CONF": SLURM_CONF})
    job_id, run = launch(tmp_path, *SMOKE, f"data.root={data}", "tracking=none", "cluster.allocation=regional",
                         name="hosts")
    state = wait_for(job_id)
    assert state["JobState"] == "COMPLETED", failure(state, run)
    assert state["Account"] == "aif-regional"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["dataset"]["datacard"]["usage"] == "accounts=aif-regional; hosts=node*"
    check = summary["usage_check"]
    assert (check["slurm_job"], check["account"], check["host"]) == (job_id, "aif-regional", state["NodeList"])
    assert check["host_from"].startswith(f"slurm job {job_id} (node confirmed by slurmctld")

    claimed = {"SLURM_CONF": SLURM_CONF, "SLURMD_NODENAME": state["NodeList"], "SLURM_JOB_ID": job_id,
               "SLURM_JOBID": job_id, "SLURM_JOB_ACCOUNT": "aif-regional"}
    here = aift("train", *SMOKE, f"data.root={data}", "tracking=none", f"hydra.run.dir={tmp_path}/here",
                cwd=tmp_path, env=claimed)
    assert here.returncode == 2 and "Traceback" not in here.stderr, here.stderr[-3000:]
    assert "usage.accounts allows the jobs of Slurm accounts ['aif-regional'], and this has no Slurm account named" \
        in here.stderr
    hosts_only = copy_with("notes_hosts", {"hosts": ["node*"]})
    for job in (job_id, "999999"):  # the finished real job, and one that never was
        here = aift("train", *SMOKE, f"data.root={hosts_only}", "tracking=none", f"hydra.run.dir={tmp_path}/here",
                    cwd=tmp_path, env={**claimed, "SLURM_JOB_ID": job, "SLURM_JOBID": job})
        assert here.returncode == 2 and "Traceback" not in here.stderr, here.stderr[-3000:]
        assert (f"usage.hosts allows the data to be used on ['node*'] only, not on '{socket.gethostname()}'"
                in here.stderr)
    assert not (tmp_path / "here" / "checkpoints").exists()


def test_a_run_dir_with_spaces_quotes_and_shell_syntax_is_one_folder_to_slurm_and_the_job(tmp_path):
    """sbatch itself reads the #SBATCH lines: the log files land in the run folder (a literal % too), the directives
    after --output are all still there, and the job's command gets the run folder as one argument. `aift` in the job
    is a stub that records its arguments (no training: the quoting is what is tested)."""
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    (bin_dir / "aift").write_text('#!/bin/bash\nprintf "%s\\0" "$@" > "$RECORD/aift.argv"\n')
    (bin_dir / "aift").chmod(0o755)
    run = tmp_path / "it's a \"run\" $(touch marker) `touch marker`; #1 %j"
    result = aift("launch", "cluster=local_slurm", "trainer.accelerator=cpu", "recipe=plastic_sorting", "tracking=none",
                  "--no-data-check", "--job-name", "quoting", "--run-dir", str(run), cwd=tmp_path,
                  env={"SLURM_CONF": SLURM_CONF, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record)})
    assert result.returncode == 0, result.stderr[-3000:]
    job = job_id_of(result.stdout)
    state = wait_for(job, timeout=300)
    assert state["JobState"] == "COMPLETED", failure(state, run)
    assert state["JobName"] == "quoting" and state["TimeLimit"] == "00:30:00" and state["Requeue"] == "1"
    assert (run / "slurm" / f"quoting-{job}.out").is_file() and (run / "slurm" / f"quoting-{job}.err").is_file()
    assert not list(tmp_path.rglob("marker"))
    argv = (record / "aift.argv").read_bytes().decode().split("\0")[:-1]
    from hydra.core.override_parser.overrides_parser import OverridesParser

    run_dir = OverridesParser.create().parse_override(argv[-1])
    assert argv[0] == "train" and run_dir.key_or_group == "hydra.run.dir" and run_dir.value() == str(run)
