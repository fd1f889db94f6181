"""`pip install .` (not editable) ships configs and recipes inside the package; `aift` runs from any folder."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO),
                    "-w", str(work / "dist")], check=True, capture_output=True, cwd=work)
    wheel = next((work / "dist").glob("aifactory_train-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(work / "site"), str(wheel)],
                   check=True, capture_output=True)
    return work


def run_installed(installed: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(installed / "site")}
    code = "import sys; from aifactory_train.commands.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_wheel_contains_every_config_and_recipe_file(installed):
    wheel = next((installed / "dist").glob("*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for config in (REPO / "configs").rglob("*.yaml"):
        assert f"aifactory_train/configs/{config.relative_to(REPO / 'configs').as_posix()}" in names
    for source in [*(REPO / "recipes").rglob("*.py"), *(REPO / "recipes").rglob("configs/*/*.yaml")]:
        assert f"aifactory_train/recipes/{source.relative_to(REPO / 'recipes').as_posix()}" in names
    assert "aifactory_train/slurm/sbatch.sh.j2" in names
    templates = REPO / "aifactory_train" / "catalogue" / "templates"  # `aift recipes new`
    for template in templates.rglob("*.tmpl"):
        assert f"aifactory_train/catalogue/templates/{template.relative_to(templates).as_posix()}" in names
    for source in [*(REPO / "benchmarks").glob("*.py"), *(REPO / "benchmarks").glob("profiles/*.yaml")]:
        assert f"aifactory_train/benchmarks/{source.relative_to(REPO / 'benchmarks').as_posix()}" in names


def test_installed_package_runs_from_another_folder(installed, tmp_path):
    where = run_installed(installed, "--version", cwd=tmp_path)
    assert where.returncode == 0 and "aifactory-train" in where.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import aifactory_train.locations as r, aifactory_train.recipes.plastic_sorting.data as d;"
                               "print(r.config_dir()); print(d.__file__)"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(installed / "site")}, capture_output=True, text=True,
    )
    assert probe.returncode == 0, probe.stderr
    assert all(line.startswith(str(installed / "site")) for line in probe.stdout.split())
    assert "plastic_sorting" in run_installed(installed, "recipes", "list", cwd=tmp_path).stdout
    launch = run_installed(installed, "launch", "--dry-run", "cluster=aifactory_h100", "strategy=ddp", cwd=tmp_path)
    assert launch.returncode == 0 and "#SBATCH --partition=gpu_h100" in launch.stdout, launch.stderr[-2000:]
    assert run_installed(installed, "data", "synth", "plastic_sorting", "--out", "d", "--size", "7", cwd=tmp_path).returncode == 0
    result = run_installed(installed, "train", "recipe=plastic_sorting", "debug=smoke", "data.root=d", "tracking=none",
                           "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "run_test=false",
                           "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "summary.json").is_file()
