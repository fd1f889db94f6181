"""Strategies: DDP, FSDP and DeepSpeed ZeRO-1/2/3 from config, their CPU smoke path (gloo, 2 processes), the DeepSpeed
JSON, consolidation of ZeRO checkpoints, and the config mistakes caught before a job runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aifactory_train.run.provenance import read_provenance
from conftest import aift
from test_config import compose_run

STRATEGY_RUN = ["recipe=clinical_notes", "debug=smoke", "trainer.devices=2", "trainer.accelerator=cpu", "tracking=none",
                "run_test=false", "trainer.limit_val_batches=1", "recipe.module.rouge_max_batches=0"]


def test_lightning_private_methods_the_cpu_smoke_path_overrides_still_exist():
    """The CPU smoke strategies override private Lightning methods (benchmarks/README.md, reference figures). If Lightning renames them,
    this fails loudly instead of the overrides silently doing nothing."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
    from lightning.pytorch.trainer.connectors.logger_connector.logger_connector import _LoggerConnector

    for name in ("setup_environment", "setup_distributed", "_setup_model_and_optimizer",
                 "_initialize_deepspeed_inference", "_init_deepspeed_distributed"):
        assert name in vars(DeepSpeedStrategy), name
    assert "_setup_model" in vars(FSDPStrategy)
    assert isinstance(vars(_LoggerConnector)["should_update_logs"], property)


@pytest.mark.parametrize("name, stage, offload", [("deepspeed_zero1", 1, False), ("deepspeed_zero2", 2, False),
                                                  ("deepspeed_zero3", 3, False), ("deepspeed_zero3_offload", 3, True)])
def test_deepspeed_json_is_built_from_the_strategy_config(tmp_path, name, stage, offload):
    from omegaconf import OmegaConf

    from aifactory_train.records.config import validate
    from aifactory_train.run.strategies import deepspeed_config

    cfg = compose_run([f"strategy={name}", "strategy.reduce_bucket_size=50000000"], tmp_path)
    validate(cfg)
    ds = deepspeed_config(OmegaConf.to_container(cfg.strategy))
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage and zero["reduce_bucket_size"] == 50_000_000 and zero["overlap_comm"] is True
    assert ("stage3_param_persistence_threshold" in zero) == (stage == 3)
    assert ("offload_param" in zero) == offload and ("offload_optimizer" in zero) == offload
    # Lightning sets these from the trainer; setting them here too would be refused
    assert not {"gradient_clipping", "gradient_accumulation_steps", "bf16", "train_micro_batch_size_per_gpu"} & set(ds)


def test_parameter_offload_without_stage_3_is_refused(tmp_path):
    from aifactory_train.records.config import validate
    from aifactory_train.errors import ConfigError

    cfg = compose_run(["strategy=deepspeed_zero2", "strategy.offload_parameters=cpu"], tmp_path)
    with pytest.raises(ConfigError, match=r"strategy\.offload_parameters.*needs strategy\.stage=3"):
        validate(cfg)
    cfg = compose_run(["strategy=deepspeed_zero3", "strategy.offload_optimizer=nvme"], tmp_path)
    with pytest.raises(ConfigError, match=r"strategy\.nvme_path"):
        validate(cfg)


def test_gpu_strategy_on_cpu_needs_the_smoke_switch(clinical_data, tmp_path):
    result = aift("train", *STRATEGY_RUN, f"data.root={clinical_data}", "strategy=fsdp", cwd=tmp_path)
    assert result.returncode == 2
    assert "fsdp shards over GPUs" in result.stderr and "strategy.cpu_smoke=true" in result.stderr
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("*.ckpt"))


@pytest.fixture(scope="module")
def strategy_runs(clinical_data, tmp_path_factory):
    """The same 4 steps of clinical_notes (full fine-tuning, no BatchNorm) on 2 CPU processes per strategy, each step
    of 32 notes: 2 accumulated batches of 8 per rank (trainer.global_batch_size), which each strategy does its own
    way (DDP and FSDP without a gradient sync on the first batch, DeepSpeed inside its engine)."""
    work = tmp_path_factory.mktemp("strategies")
    runs = {}
    for name in ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"):
        extra = ["trainer.global_batch_size=32", "trainer.limit_train_batches=8"]
        extra += [] if name == "ddp" else ["strategy.cpu_smoke=true"]
        if name == "deepspeed_zero3":
            extra.append("strategy.stage3_param_persistence_threshold=0")  # shard even the tiny model's parameters
        result = aift("train", *STRATEGY_RUN, f"data.root={clinical_data}", f"strategy={name}", *extra,
                      f"hydra.run.dir={name}", cwd=work)
        assert result.returncode == 0, (name, result.stderr[-3000:])
        runs[name] = work / name
    return runs


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    last = run / "checkpoints" / "last.ckpt"
    if last.is_dir():  # DeepSpeed: consolidate first, with the CLI a user would run
        out = run / "consolidated.ckpt"
        if not out.exists():
            result = aift("checkpoint", "consolidate", str(last), "--out", str(out), cwd=run)
            assert result.returncode == 0, result.stderr[-2000:]
        last = out
    state = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("net.")}


def test_sharded_strategies_train_the_same_weights_as_ddp(strategy_runs):
    """FSDP, ZeRO-2 and ZeRO-3 shard differently but do the same maths: after the same 4 steps the weights equal
    DDP's (float32, same seeds and data order)."""
    reference = final_weights(strategy_runs["ddp"])
    assert len(reference) > 10
    for name in ("fsdp", "deepspeed_zero2", "deepspeed_zero3"):
        weights = final_weights(strategy_runs[name])
        assert set(weights) == set(reference), name
        for key, value in reference.items():
            torch.testing.assert_close(weights[key], value, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name} {key}: {m}")
        summary = json.loads((strategy_runs[name] / "summary.json").read_text())
        assert summary["num_processes"] == 2 and summary["global_step"] == 4
        assert summary["batch"]["accumulate_grad_batches"] == 2 and summary["batch"]["global"] == 32
        # rank 0's provenance record is in the checkpoint whichever rank wrote what, and survives consolidation
        last = strategy_runs[name] / "checkpoints" / "last.ckpt"
        for path in [last] + ([strategy_runs[name] / "consolidated.ckpt"] if last.is_dir() else []):
            record = read_provenance(str(path))
            assert record["datasets"] == [summary["dataset"]], (name, path)


def test_deepspeed_run_writes_the_json_deepspeed_received(strategy_runs):
    config = json.loads((strategy_runs["deepspeed_zero3"] / "deepspeed_config.json").read_text())
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert config["gradient_clipping"] == 1.0  # clinical_notes' trainer.gradient_clip_val, filled in by Lightning
    assert config["train_micro_batch_size_per_gpu"] == 8
    # trainer.global_batch_size=32 on 2 ranks: the accumulation derived from it reached DeepSpeed
    assert config["gradient_accumulation_steps"] == 2
    assert not (strategy_runs["ddp"] / "deepspeed_config.json").exists()


def test_consolidate_refuses_what_it_cannot_or_should_not_do(strategy_runs, tmp_path):
    ddp_last = strategy_runs["ddp"] / "checkpoints" / "last.ckpt"
    result = aift("checkpoint", "consolidate", str(ddp_last), cwd=tmp_path)
    assert result.returncode == 2 and "already a single checkpoint file" in result.stderr
    result = aift("checkpoint", "consolidate", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "not a DeepSpeed checkpoint folder" in result.stderr
    existing = tmp_path / "exists.ckpt"
    existing.write_bytes(b"keep me")
    result = aift("checkpoint", "consolidate", str(strategy_runs["deepspeed_zero3"] / "checkpoints/last.ckpt"),
                  "--out", str(existing), cwd=tmp_path)
    assert result.returncode == 2 and "exists" in result.stderr and existing.read_bytes() == b"keep me"


def test_resuming_with_another_number_of_ranks(strategy_runs, clinical_data, tmp_path):
    """A DeepSpeed checkpoint of 2 ranks is refused on 1 (its optimizer state is partitioned per rank), before
    training and without touching it; a DDP checkpoint of 2 ranks resumes on 1, with a warning of what is not exact."""
    import shutil

    one_process = [a for a in STRATEGY_RUN if a != "trainer.devices=2"] + ["trainer.devices=1"]
    zero2 = Path(shutil.copytree(strategy_runs["deepspeed_zero2"], tmp_path / "zero2"))
    before = {p: p.stat().st_mtime_ns for p in (zero2 / "checkpoints").rglob("*") if p.is_file()}
    result = aift("train", *one_process, f"data.root={clinical_data}", "strategy=deepspeed_zero2", "strategy.cpu_smoke=true",
                  "ckpt_path=last", "trainer.max_epochs=2", f"hydra.run.dir={zero2}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "is a DeepSpeed checkpoint written by 2 ranks, but this job has 1" in result.stderr
    assert "aift checkpoint consolidate" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in (zero2 / "checkpoints").rglob("*") if p.is_file()} == before

    ddp = Path(shutil.copytree(strategy_runs["ddp"], tmp_path / "ddp"))
    result = aift("train", *one_process, f"data.root={clinical_data}", "strategy=ddp", "ckpt_path=last",
                  "trainer.max_epochs=2", f"hydra.run.dir={ddp}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "written by 2 ranks, with 1" in (ddp / "train.log").read_text()
    assert json.loads((ddp / "summary.json").read_text())["global_step"] > 4
