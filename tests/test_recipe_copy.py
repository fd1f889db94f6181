"""`aift recipes copy`: a recipe copied and renamed into a folder of one's own, found through AIFT_RECIPES_PATH by
every command, running its own code (never the original's); and the refusals that keep existing files whole."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import aift


def digest_of(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return h.hexdigest()


def test_a_copied_recipe_is_listed_trains_with_its_own_code_and_launches(tmp_path):
    from aifactory_train.locations import config_dir

    import aifactory_train.recipes

    # the shipped configs and recipe code, before (only those: other tests build wheels in the checkout meanwhile)
    shipped_folders = [config_dir(), Path(aifactory_train.recipes.__file__).parent]  # recipes/ holds their configs
    shipped = [digest_of(folder) for folder in shipped_folders]
    mine = tmp_path / "my_recipes"
    copied = aift("recipes", "copy", "plastic_sorting", "tulip_grading", "--to", str(mine), cwd=tmp_path)
    assert copied.returncode == 0, copied.stderr[-3000:]
    assert f"export AIFT_RECIPES_PATH={mine}" in copied.stdout
    recipe = mine / "tulip_grading"  # one folder: its code and its configs
    assert (recipe / "module.py").is_file() and (recipe / "configs/recipe/tulip_grading.yaml").is_file()
    assert (recipe / "configs/experiment/tulip_grading_gpu.yaml").is_file()
    for path in mine.rglob("*"):  # renamed throughout: nothing points back at the original
        if path.is_file():
            assert "plastic_sorting" not in path.read_text() and "PlasticSorting" not in path.read_text(), path
    env = {"AIFT_RECIPES_PATH": str(mine)}

    listed = aift("recipes", "list", cwd=tmp_path, env=env)
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert any(line.startswith("tulip_grading ") for line in listed.stdout.splitlines())
    assert f"tulip_grading: from {mine}" in listed.stdout

    synth = aift("data", "synth", "tulip_grading", "--out", str(tmp_path / "data"), "--size", "35", cwd=tmp_path, env=env)
    assert synth.returncode == 0, synth.stderr[-3000:]
    trained = aift("train", "recipe=tulip_grading", f"data.root={tmp_path / 'data'}", "debug=smoke", "tracking=none",
                   "run_test=false", "hydra.run.dir=run", cwd=tmp_path, env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["recipe"] == "tulip_grading" and summary["status"] == "completed"
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "_target_: tulip_grading.module.TulipGradingModule" in config
    assert "_target_: tulip_grading.data.TulipGradingDataModule" in config

    # a Slurm job gets the recipe folder in its script, whatever sbatch passes on of the submitting shell
    launched = aift("launch", "--dry-run", "recipe=tulip_grading", "cluster=local_slurm", "trainer.accelerator=cpu",
                    f"data.root={tmp_path / 'data'}", "--run-dir", str(tmp_path / "job"), cwd=tmp_path, env=env)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert f"export AIFT_RECIPES_PATH={mine}" in launched.stdout and "aift train recipe=tulip_grading" in launched.stdout
    assert [digest_of(folder) for folder in shipped_folders] == shipped  # the original recipe was not touched


@pytest.mark.parametrize("source", ["crop_detection", "clinical_notes"])
def test_copies_of_the_other_recipes_compose_and_import_none_of_the_original_code(source, tmp_path):
    mine = tmp_path / "my_recipes"
    name = f"my_{source}"
    copied = aift("recipes", "copy", source, name, "--to", str(mine), cwd=tmp_path)
    assert copied.returncode == 0, copied.stderr[-3000:]
    env = {"AIFT_RECIPES_PATH": str(mine)}
    composed = aift("train", f"recipe={name}", "--cfg", "job", cwd=tmp_path, env=env)
    assert composed.returncode == 0, composed.stderr[-3000:]
    assert f"name: {name}" in composed.stdout and f"_target_: {name}.module." in composed.stdout
    modules = sorted(p.stem for p in (mine / name).glob("*.py") if p.stem != "__init__")
    script = ("import importlib, sys\n"
              f"for m in {modules!r}: importlib.import_module('{name}.' + m)\n"
              "print([m for m in sys.modules if m.startswith('aifactory_train.recipes.')])")
    imported = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(mine)})
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert imported.stdout.strip() == "[]"  # the copy runs on the library, not on the recipe it came from


def test_copy_refusals_name_the_problem_and_overwrite_nothing(tmp_path):
    mine = tmp_path / "my_recipes"
    (mine / "tulip_grading").mkdir(parents=True)
    (mine / "tulip_grading" / "module.py").write_text("# my work\n")
    cases = [
        (["plastic_sortin", "tulip_grading"], "unknown recipe 'plastic_sortin'; valid recipes: clinical_notes"),
        (["plastic_sorting", "Tulip-Grading"], "recipe name 'Tulip-Grading' is not valid"),
        (["plastic_sorting", "crop_detection"], "recipe name 'crop_detection' is taken"),
        (["plastic_sorting", "datasets"], "'datasets' is the name of an importable Python module"),
        (["plastic_sorting", "tulip_grading"], f"would overwrite {mine / 'tulip_grading'}"),
    ]
    for args, message in cases:
        result = aift("recipes", "copy", *args, "--to", str(mine), cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr[-2000:])
    assert (mine / "tulip_grading" / "module.py").read_text() == "# my work\n"
    assert sorted(p.name for p in (mine / "tulip_grading").iterdir()) == ["module.py"]  # nothing half-written


def test_a_bad_recipes_path_is_named_before_anything_runs(tmp_path):
    missing = aift("recipes", "list", cwd=tmp_path, env={"AIFT_RECIPES_PATH": str(tmp_path / "nowhere")})
    assert missing.returncode == 2
    assert f"$AIFT_RECIPES_PATH: '{tmp_path / 'nowhere'}' is not a recipes folder" in missing.stderr
    clash = tmp_path / "clash"
    (clash / "plastic_sorting" / "configs" / "recipe").mkdir(parents=True)
    (clash / "plastic_sorting" / "configs" / "recipe" / "plastic_sorting.yaml").write_text("recipe: {name: plastic_sorting}\n")
    twice = aift("train", "recipe=plastic_sorting", "--cfg", "job", cwd=tmp_path, env={"AIFT_RECIPES_PATH": str(clash)})
    assert twice.returncode == 2, twice.stdout[-2000:]
    assert "recipe 'plastic_sorting' is defined twice" in twice.stderr
