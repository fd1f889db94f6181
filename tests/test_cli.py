"""The `aift` command line: help, lazy imports, recipes list, data synth."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import aift


def test_cli_module_does_not_import_heavy_packages():
    code = (
        "import sys, aifactory_train.commands.cli as c; c._parser(); "
        "heavy = [m for m in ('torch', 'lightning', 'mlflow', 'hydra', 'datasets') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_help_lists_every_subcommand(tmp_path):
    result = aift("--help", cwd=tmp_path)
    assert result.returncode == 0
    for command in ("aift train", "aift eval", "aift recipes list", "aift data synth"):
        assert command in result.stdout


def test_train_help_is_hydra_help_with_groups(tmp_path):
    result = aift("train", "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "aift train" in result.stdout
    for group in ("recipe:", "model:", "strategy:", "debug:"):
        assert group in result.stdout


def recipe_block(stdout: str, name: str) -> tuple[str, str]:
    """A recipe's table line and the indented lines below it (description, data format)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(name))
    below = []
    for line in lines[start + 1:]:
        if not line.startswith(" "):
            break
        below.append(line.strip())
    return lines[start], " ".join(below)


def test_recipes_list_shows_plastic_sorting(tmp_path):
    result = aift("recipes", "list", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    line, below = recipe_block(result.stdout, "plastic_sorting")
    assert "image_classification" in line and "resnet18" in line and "data: imagefolder" in below
    assert max(len(line) for line in result.stdout.splitlines()) <= 100  # was ~230 columns wide


def test_data_synth_writes_png_splits_and_datacard(tmp_path):
    result = aift("data", "synth", "plastic_sorting", "--out", "ds", "--size", "14", "--seed", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    root = tmp_path / "ds"
    assert (root / "datacard.yaml").is_file()
    for split in ("train", "val", "test"):
        classes = sorted(p.name for p in (root / split).iterdir())
        assert classes == ["HDPE", "LDPE", "PET", "PP", "PS", "PVC", "other"]
    assert len(list((root / "train").glob("*/*.png"))) == 14


def test_data_synth_is_deterministic_per_seed(tmp_path):
    for name in ("a", "b"):
        assert aift("data", "synth", "plastic_sorting", "--out", name, "--size", "7", "--seed", "5", cwd=tmp_path).returncode == 0
    first = sorted((tmp_path / "a").rglob("*.png"))
    second = sorted((tmp_path / "b").rglob("*.png"))
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


def test_data_synth_refuses_non_empty_folder_and_keeps_its_files(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = aift("data", "synth", "plastic_sorting", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 2
    assert "is not empty" in result.stderr and "--overwrite" in result.stderr
    assert (out / "precious.txt").read_text() == "keep me"
    assert list(out.iterdir()) == [out / "precious.txt"]


def test_data_synth_unknown_recipe_and_variant(tmp_path):
    result = aift("data", "synth", "nope", "--out", "x", cwd=tmp_path)
    assert result.returncode == 2 and "unknown recipe 'nope'" in result.stderr and "plastic_sorting" in result.stderr
    result = aift("data", "synth", "plastic_sorting", "--out", "x", "--variant", "thermal", cwd=tmp_path)
    assert result.returncode == 2 and "'thermal'" in result.stderr and "multispectral" in result.stderr


def test_recipes_list_shows_crop_detection(tmp_path):
    result = aift("recipes", "list", cwd=tmp_path)
    line, below = recipe_block(result.stdout, "crop_detection")
    assert "object_detection" in line and "fasterrcnn_mobilenet_v3_large_320_fpn" in line and "COCO" in below


def test_data_synth_overwrite_replaces_only_the_dataset(tmp_path):
    out = tmp_path / "fields"
    out.mkdir()
    (out / "notes.txt").write_text("the farmer's own notes")
    assert aift("data", "synth", "crop_detection", "--out", str(out), "--size", "4", cwd=tmp_path).returncode == 2
    for _ in range(2):  # a second --overwrite replaces the first dataset
        result = aift("data", "synth", "crop_detection", "--out", str(out), "--size", "4", "--overwrite", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    assert (out / "notes.txt").read_text() == "the farmer's own notes"
    coco = json.loads((out / "annotations" / "train.json").read_text())
    assert len(coco["images"]) == 4 and len(list((out / "images" / "train").glob("*.jpg"))) == 4
    assert {c["id"] for c in coco["categories"]} == {3, 7}
