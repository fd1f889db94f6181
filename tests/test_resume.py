"""Exact resume: a run killed with SIGKILL after a mid-epoch checkpoint and resumed (ckpt_path=auto) ends with the same
weights and the same logged loss curve as the run that was never interrupted.

Not covered, because it does not hold yet (see the README): resuming from a checkpoint written on an epoch's last
batch, and DDP on 2 processes; there the epoch after the resume is shuffled differently."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import aift

STEPS_PER_EPOCH = 15  # 120 training notes, batch 8
RUN = ["recipe=clinical_notes", "trainer.max_epochs=5", "checkpoint.every_n_train_steps=4", "trainer.log_every_n_steps=1",
       "trainer.deterministic=true", "trainer.enable_progress_bar=false", "run_test=false",
       "recipe.module.rouge_max_batches=0", "trainer.limit_val_batches=1", "ckpt_path=auto"]


def loss_curve(uri: str, run_id: str) -> dict[int, float]:
    """train/loss per step; where a step was logged twice (before a kill and after the resume), the later value."""
    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "train/loss")
    curve = {}
    for metric in sorted(history, key=lambda m: m.timestamp):
        curve[metric.step] = metric.value
    return curve


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def killed_after_a_checkpoint(args: list[str], cwd: Path, run: Path, seed: int) -> None:
    """Start the run, wait for its first mid-epoch checkpoint, wait a random moment more, SIGKILL it (and its ranks)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AIFT_"))}
    process = subprocess.Popen([sys.executable, "-m", "aifactory_train.cli", *args], cwd=cwd, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(seed).uniform(0.0, 0.3))
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (run / "summary.json").exists(), "the run finished before it could be killed; nothing was tested"
    assert last.exists()


def test_sigkill_then_resume_gives_the_same_weights_and_loss_curve(clinical_data, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = [*RUN, f"data.root={clinical_data}", f"tracking.uri={uri}"]

    straight = aift("train", *common, "hydra.run.dir=straight", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed_after_a_checkpoint(["train", *common, "hydra.run.dir=interrupted"], tmp_path, tmp_path / "interrupted",
                              seed=1)
    first_state = torch.load(tmp_path / "interrupted/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    resumed_from_step = first_state["global_step"]
    assert resumed_from_step % STEPS_PER_EPOCH != 0, "killed after an epoch-end checkpoint: not what this test covers"
    resumed = aift("train", *common, "hydra.run.dir=interrupted", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a = json.loads((tmp_path / "straight/summary.json").read_text())
    b = json.loads((tmp_path / "interrupted/summary.json").read_text())
    assert b["resumed_from"].endswith("last.ckpt") and 0 < resumed_from_step < a["global_step"]
    assert b["global_step"] == a["global_step"] and b["epochs"] == a["epochs"]
    assert b["mlflow_run_id"] == json.loads((tmp_path / "interrupted/tracking.json").read_text())["run_id"]
    curve_a, curve_b = loss_curve(uri, a["mlflow_run_id"]), loss_curve(uri, b["mlflow_run_id"])
    assert sorted(curve_a) == sorted(curve_b) and len(curve_a) >= a["global_step"]
    assert [(s, curve_b[s]) for s in sorted(curve_b) if s >= resumed_from_step] == \
           [(s, curve_a[s]) for s in sorted(curve_a) if s >= resumed_from_step], resumed_from_step
    for key, value in weights(tmp_path / "straight").items():
        assert torch.equal(weights(tmp_path / "interrupted")[key], value), key


def test_checkpoint_is_written_atomically(tmp_path):
    """A kill during saving leaves the previous checkpoint loadable: the new one goes to .tmp first."""
    from aifactory_train.resume import AtomicCheckpointIO

    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)

    class Boom(Exception):
        pass

    original = torch.save

    def half_written(obj, target, *args, **kwargs):
        Path(target).write_bytes(b"\x00" * 10)  # a partial file, then the process "dies"
        raise Boom

    torch.save = half_written
    try:
        with pytest.raises(Boom):
            io.save_checkpoint({"step": 2}, path)
    finally:
        torch.save = original
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_ckpt_path_auto_starts_fresh_without_a_checkpoint(tmp_path):
    from aifactory_train.checkpoints import resolve_checkpoint

    assert resolve_checkpoint("auto", tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    torch.save({"a": 1}, tmp_path / "checkpoints/last.ckpt")
    time.sleep(0.01)
    torch.save({"a": 2}, tmp_path / "hpc_ckpt_1.ckpt")
    assert resolve_checkpoint("auto", tmp_path) == str(tmp_path / "hpc_ckpt_1.ckpt")  # the newest wins
