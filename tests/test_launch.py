"""`aift launch`: the sbatch script for a cluster profile, and the checks that run before anything is submitted.

Submitting to a real Slurm cluster is not tested yet (that comes with the cluster the tests will start)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import aift

GOLDEN = Path(__file__).parent / "assets" / "sbatch_aifactory_h100_4nodes.sh"
H100_PLANNED = ["recipe=plastic_sorting", "cluster=aifactory_h100", "trainer.num_nodes=4", "strategy=ddp"]
# cluster.hardware=null: no plan check (it builds the model: ~8 s a start); tests/test_plan.py tests that check
H100_4_NODES = [*H100_PLANNED, "cluster.hardware=null"]


def script_of(stdout: str) -> str:
    return stdout[stdout.index("#!/bin/bash"):]


def test_sbatch_for_four_h100_nodes_matches_the_golden_file(tmp_path):
    result = aift("launch", "--dry-run", *H100_PLANNED, "--job-name", "golden", "--run-dir", "/scratch/aif/run1",
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    script = script_of(result.stdout)
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(script)
    assert script == GOLDEN.read_text()
    assert "--ntasks-per-node=4" in script and "--nodes=4" in script and "srun " in script
    assert "--signal=USR1@300" in script and "B:USR1" not in script
    assert "trainer.devices=4 trainer.num_nodes=4 hydra.run.dir=/scratch/aif/run1" in script
    assert "paths:\n  data_dir: data\n  output_dir: /scratch/aif/run1" in result.stdout  # the resolved config too
    assert not (tmp_path / "outputs").exists()  # a dry run writes nothing


def test_allocation_track_selects_the_account(tmp_path):
    result = aift("launch", "--dry-run", *H100_4_NODES, "cluster.allocation=euro_hpc", cwd=tmp_path)
    assert "#SBATCH --account=aif-eurohpc" in result.stdout


@pytest.mark.parametrize("overrides, message", [
    (["trainer.devices=8"], "trainer.devices=8 but cluster 'aifactory_h100' nodes have 4 GPUs"),
    (["strategy=single"], "strategy=single runs one process"),
    (["cluster.node.gpus=0", "trainer.accelerator=gpu"], "has no GPUs"),
    (["cluster.cpus_per_task=32"], "exceeds the 64 CPUs"),
    (["cluster.allocation=eu"], "cluster.allocation"),
    (["cluster.time_limit=2h"], "[days-]hh:mm:ss"),
    (["cluster=local"], "needs a Slurm profile"),
    (["cluster=local_slurm", "trainer.accelerator=cpu", "trainer.devices=2", "strategy=deepspeed_zero3"],
     "strategy=deepspeed shards over GPUs, but cluster 'local_slurm' has none"),
    (["strategy=deepspeed_zero2", "strategy.offload_parameters=cpu"], "needs strategy.stage=3"),
    (["cluster.time_limit=00:20:00", "checkpoint.every_n_minutes=30"], "ends the job before the first checkpoint"),
    # devices: auto is the profile's 4 GPUs per node: 16 ranks of data.batch_size 32 make 512 per round
    (["trainer.global_batch_size=1000"], "1000 is not a multiple of data.batch_size x ranks = 32 x 16 = 512"),
])
def test_jobs_that_do_not_fit_are_refused_before_submission(overrides, message, tmp_path):
    base = [o for o in H100_4_NODES if not (o.startswith("strategy=") and any(x.startswith("strategy=") for x in overrides))]
    base = [o for o in base if not (o.split("=")[0] in ("cluster", "cluster.hardware")
                                    and any(x.startswith("cluster=") for x in overrides))]
    result = aift("launch", "--dry-run", *base, *overrides, cwd=tmp_path)
    assert result.returncode == 2, result.stdout[-1000:]
    assert message in result.stderr


def test_without_sbatch_it_says_so_and_offers_dry_run(tmp_path):
    result = aift("launch", *H100_4_NODES, "--no-data-check", cwd=tmp_path, env={"PATH": str(tmp_path / "no-such-bin")})
    assert result.returncode == 2
    assert "sbatch was not found" in result.stderr and "--dry-run" in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_a_job_without_its_data_is_refused_before_anything_is_queued(tmp_path):
    line3 = tmp_path / "line3"
    for split in ("train", "val"):
        (line3 / split).mkdir(parents=True)
    no_sbatch = {"PATH": str(tmp_path / "no-such-bin")}  # the data is checked before sbatch is looked up
    # a sweep over two data roots, one of them mistyped: every point is checked before the first is submitted
    result = aift("launch", "-m", *H100_4_NODES, f"data.root={line3},{tmp_path}/line4", cwd=tmp_path, env=no_sbatch)
    assert result.returncode == 2, result.stdout[-1000:]
    assert f"data.root '{tmp_path}/line4' does not exist" in result.stderr and "sbatch" not in result.stderr
    assert not (tmp_path / "outputs").exists()
    # data only the compute nodes see (node-local disk): --no-data-check submits without looking
    result = aift("launch", *H100_4_NODES, f"data.root={tmp_path}/line4", "--no-data-check", cwd=tmp_path, env=no_sbatch)
    assert result.returncode == 2 and "sbatch was not found" in result.stderr


def test_multirun_renders_one_job_per_sweep_point(tmp_path):
    result = aift("launch", "-m", "--dry-run", *H100_4_NODES, "seed=1,2", "optim.lr=0.001,0.003",
                  "--run-dir", str(tmp_path / "sweep"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    commands = [line for line in result.stdout.splitlines() if line.startswith("srun ")]
    assert len(commands) == 4
    for index, (seed, lr) in enumerate([(1, 0.001), (1, 0.003), (2, 0.001), (2, 0.003)]):
        assert f"seed={seed} optim.lr={lr}" in commands[index] and f"hydra.run.dir={tmp_path}/sweep/{index}" in commands[index]
        assert f"#SBATCH --output={tmp_path}/sweep/{index}/slurm/" in result.stdout


def test_a_sweep_without_m_or_with_a_bad_point_submits_nothing(tmp_path):
    result = aift("launch", "--dry-run", *H100_4_NODES, "seed=1,2", cwd=tmp_path)
    assert result.returncode == 2 and "seed=1,2: a sweep (2 points); add -m" in result.stderr
    # the second point does not fit a 4-GPU node: refused before the first is submitted (sbatch is not even looked up)
    result = aift("launch", "-m", *H100_4_NODES, "trainer.devices=4,8", cwd=tmp_path,
                  env={"PATH": str(tmp_path / "no-such-bin")})
    assert result.returncode == 2 and "trainer.devices=8 but cluster 'aifactory_h100' nodes have 4 GPUs" in result.stderr
    assert "sbatch was not found" not in result.stderr and not (tmp_path / "outputs").exists()


def test_launch_local_runs_n_processes_on_this_machine(clinical_data, tmp_path):
    result = aift("launch", "--local", "2", "recipe=clinical_notes", f"data.root={clinical_data}", "debug=smoke",
                  "trainer.accelerator=cpu", "tracking=none", "run_test=false", "recipe.module.rouge_max_batches=0",
                  "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["global_step"] == 4
