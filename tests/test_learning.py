"""The synthetic data is learnable: a short CPU run gets clearly above chance (1/7) on validation."""

from __future__ import annotations

import json

from conftest import aift


def test_short_cpu_run_reaches_well_above_chance(tmp_path):
    assert aift("data", "synth", "plastic_sorting", "--out", "data", "--size", "280", "--seed", "3", cwd=tmp_path).returncode == 0
    result = aift("train", "recipe=plastic_sorting", "data.root=data", "trainer.max_epochs=3", "data.image_size=32",
                  "tracking=none", "run_test=false", "trainer.enable_progress_bar=false", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "summary.json").read_text())["metrics"]
    chance = 1 / 7
    assert metrics["val/acc"] > 0.5 and 0.5 > 3 * chance
    assert metrics["val/f1_macro"] > 0.4
