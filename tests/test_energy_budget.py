"""energy.budget_kwh: a run stops cleanly at a step boundary once its measured energy reaches the budget, with a
checkpoint that `ckpt_path=auto` resumes; summary.json says the budget stopped it. The energy comes from powercap
counter files a test thread keeps counting at 50 W (conftest.PowercapFiles; this machine has no RAPL counter),
read by the run exactly as it reads /sys/class/powercap."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from conftest import PowercapFiles, aift, assert_one_line_naming

# 4 training batches in the epoch: the budget trips at the first step boundary (the epoch's last batch is none)
SMOKE = ["recipe=plastic_sorting", "debug=smoke", "data.batch_size=16", "run_test=false"]
BUDGET_KWH = 1e-6  # 3.6 J: about 0.07 s of the 50 W counter, spent before the first step ends


@pytest.fixture(scope="module")
def budget_runs(plastic_data, tmp_path_factory):
    """One run stopped by its budget, then resumed with ckpt_path=auto and a larger budget (one counter for both)."""
    tmp = tmp_path_factory.mktemp("budget")
    counter = PowercapFiles(tmp / "powercap", watts=50.0)
    uri = f"sqlite:///{tmp}/mlflow.db"
    run = tmp / "run"
    common = [*SMOKE, f"data.root={plastic_data}", f"hydra.run.dir={run}", f"tracking.uri={uri}",
              "energy.meter=rapl", f"energy.powercap_dir={counter.root}", "energy.sample_every_s=0.5"]
    try:
        stopped = aift("train", *common, f"energy.budget_kwh={BUDGET_KWH}", cwd=tmp)
        first = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else None
        resumed = aift("train", *common, "energy.budget_kwh=1", "ckpt_path=auto", cwd=tmp)
        second = json.loads((run / "summary.json").read_text())
    finally:
        counter.close()
    return {"run": run, "uri": uri, "stopped": stopped, "first": first, "resumed": resumed, "second": second}


@pytest.mark.e2e
def test_the_budget_stops_the_run_at_a_step_with_a_checkpoint_and_says_so(budget_runs):
    result, summary = budget_runs["stopped"], budget_runs["first"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stopped: energy.budget_kwh=1e-06 reached at step" in result.stdout
    assert summary["status"] == "stopped_energy_budget"
    budget = summary["energy_budget"]
    assert budget["stopped"] is True and budget["budget_kwh"] == BUDGET_KWH
    assert budget["kwh_at_stop"] >= BUDGET_KWH and summary["energy"]["kwh"] >= budget["kwh_at_stop"]
    assert 1 <= summary["global_step"] < 4  # before the epoch's end: stopped, not finished
    checkpoint = budget_runs["run"] / f"hpc_ckpt_{summary['global_step']}.ckpt"
    assert budget["checkpoint"] == summary["checkpoint"] == str(checkpoint) and checkpoint.is_file()
    energy = summary["energy"]  # 50 W over what it measured, per the samples it trained
    assert energy["joules_per_sample"] == pytest.approx(energy["joules"] / (summary["global_step"] * 16))
    run = MlflowClient(tracking_uri=budget_runs["uri"]).get_run(summary["mlflow_run_id"])
    assert run.data.tags["aift.stopped"] == "energy_budget"  # the run was left open: the resume logs into it


@pytest.mark.e2e
def test_ckpt_path_auto_resumes_a_run_the_budget_stopped(budget_runs):
    result, first, summary = budget_runs["resumed"], budget_runs["first"], budget_runs["second"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert summary["status"] == "completed" and summary["global_step"] == 4  # the epoch's 4 steps, in all
    assert summary["resumed_from"] == first["checkpoint"]
    assert summary["mlflow_run_id"] == first["mlflow_run_id"]
    assert summary["energy_budget"] == {"budget_kwh": 1, "stopped": False, "kwh_total": summary["energy"]["kwh"]}
    energy = summary["energy"]
    assert energy["segments"] == 2 and energy["joules"] > first["energy"]["joules"]
    assert energy["samples_counted"] == "optimizer steps x global batch"
    assert energy["joules_per_sample"] == pytest.approx(energy["joules"] / (4 * 16))
    metrics = MlflowClient(tracking_uri=budget_runs["uri"]).get_run(summary["mlflow_run_id"]).data.metrics
    assert metrics["energy/joules_per_sample"] == pytest.approx(energy["joules_per_sample"])


def test_a_budget_without_a_counter_to_measure_it_is_refused():
    from aifactory_train.run.energy_budget import no_counter_reason

    assert no_counter_reason(None, (), "energy.meter=none") is None
    assert no_counter_reason(2.0, ("rapl",), None) is None
    message = no_counter_reason(2.0, (), "no CPU energy counter (powercap/RAPL) in /nowhere")
    assert_one_line_naming(message, ["energy.budget_kwh", "2.0", "no CPU energy counter", "null (no budget)"])


def test_joules_per_sample_of_a_run_in_one_job_uses_the_counted_samples_and_tokens():
    from aifactory_train.run.energy_budget import energy_per_sample, run_samples

    summary = {"train_samples": 64, "train_tokens": 6400, "global_step": 4, "batch": {"global": 16}}
    per = energy_per_sample({"measured": True, "joules": 128.0}, *run_samples(summary, resumed=False))
    assert per == {"joules_per_sample": 2.0, "joules_per_token": 0.02, "samples_counted": "counted"}
    assert energy_per_sample({"measured": False, "reason": "none"}, 64, None, "counted") == {}
