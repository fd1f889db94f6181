"""``last.ckpt`` is the last state: at every epoch end and at the end of fit, whatever the monitor does."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import aift


def _step_and_epoch(path: str | Path) -> tuple[int, int]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt["global_step"], ckpt["epoch"]


def test_last_checkpoint_follows_training_when_the_monitor_stops_improving(plastic_data, tmp_path):
    # monitor=epoch in mode min: the first epoch is the best and no later one improves, deterministically. Lightning
    # 2.6 alone then leaves last.ckpt at the end of epoch 0.
    result = aift("train", "recipe=plastic_sorting", "debug=smoke", "data.batch_size=16", "trainer.max_epochs=3",
                  "recipe.monitor=epoch", "recipe.monitor_mode=min", f"data.root={plastic_data}",
                  "hydra.run.dir=run", "tracking=none", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["global_step"] == 12  # 3 epochs of 4 batches
    best_step, best_epoch = _step_and_epoch(summary["best_checkpoint"])
    assert (best_step, best_epoch) == (4, 0)
    last = summary["last_checkpoint"]
    assert Path(last).name == "last.ckpt"
    assert _step_and_epoch(last) == (12, 2)
    best_weights = torch.load(summary["best_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    last_weights = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    assert any(not torch.equal(best_weights[k], last_weights[k]) for k in best_weights)
