"""`aift recipes show`: every recipe (shipped, and a new one found via AIFT_RECIPES_PATH) shown from its own files:
task, data layout, experiments with launch lines, options with defaults, demo data, exports, latest benchmark."""

from __future__ import annotations

import json

import pytest

from aifactory_train.catalogue.new import new_recipe
from aifactory_train.catalogue.show import latest_benchmark, show_recipe
from aifactory_train.commands.cli import main

SHIPPED = ["plastic_sorting", "crop_detection", "clinical_notes"]
EXPORTS = {"plastic_sorting": "format=onnx", "crop_detection": "format=onnx", "clinical_notes": "format=hf"}


@pytest.fixture(autouse=True)
def _no_recipes_path(monkeypatch):
    monkeypatch.delenv("AIFT_RECIPES_PATH", raising=False)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_is_shown_from_its_files(name, capsys):
    from aifactory_train.locations import recipe_info

    assert main(["recipes", "show", name]) == 0
    text = capsys.readouterr().out
    info = recipe_info(name)
    assert text.startswith(f"{name}: {info.task}")
    assert info.data_format.split()[0] in text
    assert f"aift data synth {name} --out data/{name}" in text
    for experiment in (f"{name}_gpu",):  # each shipped recipe has a GPU experiment
        assert f"aift launch recipe={name} experiment={experiment} cluster=CLUSTER" in text
    assert "    batch_size=" in text and "    lr=" in text  # data and optim defaults
    assert EXPORTS[name] in text
    latest = latest_benchmark(name)
    assert latest is not None and latest[0].name in text  # each shipped recipe has benchmark results


def test_a_new_recipe_is_shown_with_its_own_options(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    new_recipe("demo_show", "causal_lm", mine)
    monkeypatch.setenv("AIFT_RECIPES_PATH", str(mine))
    monkeypatch.syspath_prepend(str(mine))
    text = show_recipe("demo_show")
    assert text.startswith("demo_show: causal_lm") and f"(from $AIFT_RECIPES_PATH {mine})" in text
    assert "seq_len=64" in text and "tokens (UTF-8 bytes) per training sequence" in text
    assert "aift launch recipe=demo_show experiment=demo_show_gpu cluster=CLUSTER" in text
    assert "none (the module has no EXPORT_FORMATS)" in text
    assert "none in benchmarks/results/" in text


def test_a_copied_recipe_is_shown_as_its_original(tmp_path, monkeypatch):
    from aifactory_train.catalogue.copy import copy_recipe

    mine = tmp_path / "mine"
    copy_recipe("plastic_sorting", "tulip_grading", mine)
    monkeypatch.setenv("AIFT_RECIPES_PATH", str(mine))
    monkeypatch.syspath_prepend(str(mine))
    text = show_recipe("tulip_grading")
    assert text.startswith("tulip_grading: image_classification")
    assert "aift launch recipe=tulip_grading experiment=tulip_grading_gpu cluster=CLUSTER" in text
    assert "format=onnx" in text  # its own module class, imported from the copy
    assert "none in benchmarks/results/" in text  # the original's benchmarks are not the copy's


def test_the_newest_result_naming_the_recipe_is_chosen(tmp_path):
    (tmp_path / "demo_step_cpu_2026-01-02.json").write_text(json.dumps({"date": "2026-01-02", "step": [
        {"recipe_samples_per_s": 10.0, "plain_samples_per_s": 9.0}]}))
    (tmp_path / "demo_step_cpu_2026-03-04.json").write_text(json.dumps({"date": "2026-03-04", "step": [
        {"recipe_samples_per_s": 12.5, "plain_samples_per_s": 11.0}]}))
    (tmp_path / "other.json").write_text(json.dumps({"recipe": "demo", "date": "2025-12-31"}))
    (tmp_path / "demos_2027-01-01.json").write_text(json.dumps({"date": "2027-01-01"}))  # another recipe's
    path, result = latest_benchmark("demo", tmp_path)
    assert path.name == "demo_step_cpu_2026-03-04.json"


def test_an_unknown_recipe_is_one_line_naming_the_valid_ones(capsys):
    assert main(["recipes", "show", "nope"]) != 0
    err = capsys.readouterr().err
    assert "unknown recipe 'nope'" in err and "plastic_sorting" in err and len(err.strip().splitlines()) == 1
