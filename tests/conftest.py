"""Shared fixtures: synthetic datasets written as real files, and a runner for the `aift` CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def aift(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (as a user would), with a clean MLflow environment."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AIFT_"))}
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "aifactory_train.cli", *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture(scope="session")
def plastic_data(tmp_path_factory) -> Path:
    """A small RGB plastic_sorting dataset (70 train, 18 val, 18 test PNGs). Read-only for tests."""
    from aifactory_train.recipes.plastic_sorting.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("data") / "plastic", size=70, seed=1)


@pytest.fixture(scope="session")
def plastic_data_ms(tmp_path_factory) -> Path:
    """A small multispectral (R, G, B, NIR as .npy) plastic_sorting dataset."""
    from aifactory_train.recipes.plastic_sorting.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("data") / "plastic_ms", size=35, seed=2, variant="multispectral")


@pytest.fixture
def data_copy(plastic_data, tmp_path) -> Path:
    """A private copy of the RGB dataset that a test may damage."""
    import shutil

    return Path(shutil.copytree(plastic_data, tmp_path / "plastic"))


@pytest.fixture(scope="session")
def crop_data(tmp_path_factory) -> Path:
    """A small crop_detection dataset: 24 train, 6 val, 6 test JPEGs with COCO JSON (ids 3=crop, 7=weed)."""
    from aifactory_train.recipes.crop_detection.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("data") / "crops", size=24, seed=4)


@pytest.fixture
def crop_copy(crop_data, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(crop_data, tmp_path / "crops"))


@pytest.fixture(scope="session")
def data_roots(plastic_data, crop_data) -> dict:
    return {"plastic_sorting": plastic_data, "crop_detection": crop_data}
