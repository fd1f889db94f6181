"""`aift plan`: memory per GPU, speed, GPU-hours, kWh and allocation of a job before it is queued, and `aift launch`
refusing (or, with --ignore-plan, recording) a job the plan refuses. In-process (`cli.main`): no subprocess starts;
the models are built on the meta device, so a 7B model costs no memory. How close the memory estimate comes to
measured runs is benchmarks/plan_memory.py's job, not a test's."""

from __future__ import annotations

import json

import pytest

from aifactory_train.launch import plan as plan_module
from aifactory_train.commands.cli import main
from conftest import assert_one_line_naming

H100_4x4_ZERO3 = ["experiment=clinical_notes_gpu", "cluster=aifactory_h100", "trainer.num_nodes=4",
                  "strategy=deepspeed_zero3", "trainer.max_steps=20000"]
# a 6.7B Llama (hidden 4096, 32 layers): its AdamW states alone outgrow one 80 GB GPU without sharding
LLAMA_7B = ["recipe=clinical_notes", "cluster=aifactory_h100", "model=llama_374m", "model.hidden_size=4096",
            "model.num_layers=32", "model.num_heads=32", "model.intermediate_size=11008", "data.max_length=512",
            "data.batch_size=1", "trainer.max_steps=100"]


@pytest.fixture(scope="module")
def clinical_plan(tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    assert main(["plan", *H100_4x4_ZERO3, "--format", "json", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_clinical_notes_on_four_h100_nodes_with_zero3_prints_memory_gpu_hours_and_kwh(clinical_plan):
    text = plan_module.render_text(clinical_plan)  # what `aift plan` prints without --format json
    for line in ("memory per GPU:", "optimizer states", "activations", "deepspeed estimate_zero3_model_states_mem_needs",
                 "speed (EXTRAPOLATED)", "GPU-hours:", "kWh at 700 W per GPU", "CO2:", "allocation: track regional",
                 "start: ", "launch.start=now"):
        assert line in text, (line, text)


def test_the_plan_adds_up(clinical_plan):
    plan = clinical_plan
    assert plan["job"] == {"nodes": 4, "gpus_per_node": 4, "device": "GPU", "ranks": 16, "micro_batch": 8, "accumulate_grad_batches": 1,
                           "global_batch": 128}
    assert plan["model_facts"]["parameters"] == pytest.approx(374e6, rel=0.01)  # counted on the meta device
    memory = plan["memory"]
    assert memory["total_bytes"] == pytest.approx(sum(memory["bytes"].values()), abs=len(memory["bytes"]))
    assert memory["fits"] is True and memory["gpu_memory_gib"] == 79
    # ZeRO-3 model states per GPU close to DeepSpeed's own estimator (which counts the same bytes per parameter)
    states = sum(memory["bytes"][k] for k in ("parameters", "gradients", "optimizer_states"))
    assert states == pytest.approx(memory["deepspeed_estimator"]["gpu_bytes"], rel=0.15)
    speed, cost = plan["speed"], plan["cost"]
    assert speed["extrapolated"] is True  # no H100 measurement: the H200's, scaled
    assert speed["step_s"] == pytest.approx(speed["compute_s"] + speed["communication_s"])
    assert speed["communication_s"] > 0 and speed["allreduce_from"].startswith("cluster.internode_busbw_gbps")
    assert cost["gpu_hours"] == pytest.approx(20000 * speed["step_s"] / 3600 * 16)
    assert cost["kwh"] == pytest.approx(cost["gpu_hours"] * 0.7)
    assert cost["kg_co2"] == pytest.approx(cost["kwh"] * 0.3)
    allocation = plan["allocation"]  # used: None without accounting; with the test cluster's, its (CPU) jobs: 0
    assert allocation["fits"] is True and allocation["granted_gpu_hours"] == 100_000
    if allocation["used_gpu_hours"] is not None:
        assert allocation["remaining_gpu_hours"] == allocation["granted_gpu_hours"] - allocation["used_gpu_hours"]
    assert plan["refusals"] == []


def test_memory_follows_the_strategy_and_the_batch():
    resolved = plan_module.compose_resolved(["recipe=clinical_notes", "cluster=aifactory_h100", "trainer.num_nodes=4",
                                             "strategy=ddp", "data.batch_size=4"])
    facts4 = plan_module.model_facts(resolved, 4, "bf16-mixed")
    facts8 = plan_module.model_facts(resolved, 8, "bf16-mixed")
    assert facts8.activation_bytes == pytest.approx(2 * facts4.activation_bytes, rel=0.02)

    def states(strategy):
        parts = plan_module.memory_per_gpu(facts4, strategy, "bf16-mixed", resolved["optim"], 16, 4, 4)["bytes"]
        return parts["parameters"] + parts["gradients"] + parts["optimizer_states"]

    ddp = states({"name": "ddp"})
    zero1, zero2 = states({"name": "deepspeed", "stage": 1}), states({"name": "deepspeed", "stage": 2})
    zero3 = states({"name": "deepspeed", "stage": 3})
    assert ddp > zero1 > zero2 > zero3


def test_a_strategy_that_does_not_fit_is_refused_and_the_one_that_would_is_named(capsys, tmp_path):
    assert main(["plan", *LLAMA_7B, "strategy=ddp", "--format", "json", "--out", str(tmp_path / "p.json")]) == 0
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["model_facts"]["parameters"] == pytest.approx(6.7e9, rel=0.03)
    assert plan["memory"]["fits"] is False and plan["memory"]["would_fit"]["strategy"].startswith("deepspeed_zero")
    code = main(["launch", "--dry-run", *LLAMA_7B, "strategy=ddp"])
    err = capsys.readouterr().err
    assert code == 2
    assert_one_line_naming(err.strip(), ["aift plan refuses this job: memory:", "with ddp exceeds",
                                         f"strategy={plan['memory']['would_fit']['strategy']} would fit",
                                         "--ignore-plan"])


def test_a_model_no_strategy_can_fit_is_one_line(capsys):
    # 512 rows of 2048 tokens per GPU: the activations alone outgrow an 80 GB GPU, whatever shards the model states
    code = main(["plan", *H100_4x4_ZERO3, "data.batch_size=512"])
    err = capsys.readouterr().err
    assert code == 2
    assert_one_line_naming(err.strip(), ["llama_374m (374M parameters, 2048 tokens", "micro-batch 512",
                                         "fits no strategy on 16 x 79 GiB GPUs of cluster 'aifactory_h100'",
                                         "strategy=deepspeed_zero3_offload", "trainer.num_nodes", "data.batch_size"])


@pytest.mark.parametrize("budget", ["0", "-1.5"])
def test_an_energy_budget_of_zero_or_less_is_one_line(budget, capsys):
    assert main(["plan", "recipe=clinical_notes", f"energy.budget_kwh={budget}"]) == 2
    assert_one_line_naming(capsys.readouterr().err.strip(),
                           ["energy.budget_kwh", budget.lstrip("-").rstrip("0") or "0", "> 0, or null"])


def test_launch_refuses_a_plan_over_the_energy_budget_and_ignore_plan_records_the_override(capsys, tmp_path):
    code = main(["launch", "--dry-run", *H100_4x4_ZERO3, "energy.budget_kwh=1"])
    err = capsys.readouterr().err
    assert code == 2
    assert_one_line_naming(err.strip(), ["aift plan refuses this job: energy: the plan needs", "energy.budget_kwh=1"])
    assert main(["launch", "--dry-run", "--ignore-plan", *H100_4x4_ZERO3, "energy.budget_kwh=1"]) == 0
    captured = capsys.readouterr()
    assert "warning: --ignore-plan: submitted although the plan refuses it: energy:" in captured.err
    script = captured.out[captured.out.index("#!/bin/bash"):]
    note = [line for line in script.splitlines() if line.startswith("# aift launch --ignore-plan")]
    assert len(note) == 1 and "energy.budget_kwh=1" in note[0]
    # the note sits after the last #SBATCH line, so sbatch still reads every directive
    lines = script.splitlines()
    assert lines.index(note[0]) > max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))


def test_the_remaining_allocation_is_the_grant_less_what_accounting_says_was_used(monkeypatch, capsys):
    """used_gpu_hours is what `aift usage` backs with sacct; here it answers as accounting would."""
    monkeypatch.setattr(plan_module, "used_gpu_hours", lambda track, profile: 99_990.0 if track == "regional" else None)
    code = main(["launch", "--dry-run", *H100_4x4_ZERO3])
    err = capsys.readouterr().err
    assert code == 2
    assert_one_line_naming(err.strip(), ["allocation:", "GPU-hours exceed track 'regional''s remaining 10.0"])
    assert main(["launch", "--dry-run", *H100_4x4_ZERO3, "cluster.allocation=euro_hpc"]) == 0  # another track


def test_without_accounting_the_track_usage_is_unknown_not_zero(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sacct on PATH: no accounting answers
    assert plan_module.used_gpu_hours("regional", {"accounts": {"regional": "aif-regional"}}) is None


def test_an_offpeak_start_is_planned_inside_the_profile_window(tmp_path):
    from datetime import datetime

    out = tmp_path / "plan.json"
    assert main(["plan", *H100_4x4_ZERO3, "launch.start=offpeak", "--format", "json", "--out", str(out)]) == 0
    start = json.loads(out.read_text())["start"]
    assert start["mode"] == "offpeak" and start["over"] == "the planned wall time"
    begin = datetime.fromisoformat(start["begin"])  # Amsterdam wall clock; aifactory_h100: 22:00-07:00
    assert begin.hour >= 22 or begin.hour < 7, start
    assert "start:" in plan_module.render_text(json.loads(out.read_text()))
