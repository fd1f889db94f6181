"""`aift recipes new`: a minimal recipe per task, written from its template into an empty folder, that `aift data
synth`, `aift train` and `aift launch --dry-run` then run as they run a shipped recipe (found via AIFT_RECIPES_PATH);
and the refusals that keep existing files whole.

`recipes new` runs in this process (it imports nothing heavy); synth, train and launch run as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import aift

from aifactory_train.catalogue.new import tasks
from aifactory_train.commands.cli import main

ENV = {"OMP_NUM_THREADS": "1"}


def new(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["recipes", "new", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(autouse=True)
def _no_recipes_path(monkeypatch):
    monkeypatch.delenv("AIFT_RECIPES_PATH", raising=False)


def test_every_template_is_a_task_of_the_cli():
    assert {"image_classification", "object_detection", "causal_lm", "forecasting", "semantic_segmentation"} <= set(
        tasks())


@pytest.mark.e2e
@pytest.mark.parametrize("task", ["image_classification", "object_detection", "causal_lm", "forecasting",
                                  "semantic_segmentation"])
def test_a_new_recipe_synthesizes_trains_and_launches(task, tmp_path, capsys):
    name = {"image_classification": "demo_cls", "object_detection": "demo_det", "causal_lm": "demo_lm",
            "forecasting": "demo_fc", "semantic_segmentation": "demo_seg"}[task]
    mine = tmp_path / "mine"
    code, out, err = new(capsys, name, "--task", task, "--to", str(mine))
    assert code == 0, err
    assert f"export AIFT_RECIPES_PATH={mine}" in out
    written = sorted(str(p.relative_to(mine)) for p in mine.rglob("*") if p.is_file())
    assert written == sorted(f"{name}/{f}" for f in [
        "__init__.py", "config.py", "data.py", "module.py", "synth.py", f"configs/recipe/{name}.yaml",
        f"configs/data/{name}.yaml", f"configs/experiment/{name}_gpu.yaml"])
    for path in mine.rglob("*"):  # every placeholder filled
        assert "{{" not in path.name and (path.is_dir() or "{{name}}" not in path.read_text()), path
    env = {**ENV, "AIFT_RECIPES_PATH": str(mine)}

    synth = aift("data", "synth", name, "--out", str(tmp_path / "data"), "--size", "12", cwd=tmp_path, env=env)
    assert synth.returncode == 0, synth.stderr[-3000:]
    assert (tmp_path / "data" / "datacard.yaml").is_file()
    trained = aift("train", f"recipe={name}", f"data.root={tmp_path / 'data'}", "debug=smoke", "tracking=none",
                   "hydra.run.dir=run", cwd=tmp_path, env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["recipe"] == name and summary["status"] == "completed", summary
    assert summary["dataset"]["datacard"]["license"] == "CC0-1.0"  # the data card synth wrote, on record
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()

    if task == "image_classification":  # launch does not depend on the task: once is enough
        launched = aift("launch", "--dry-run", f"recipe={name}", f"experiment={name}_gpu", "cluster=local_slurm",
                        "trainer.accelerator=cpu", "trainer.precision=32-true", f"data.root={tmp_path / 'data'}",
                        "--run-dir", str(tmp_path / "job"), cwd=tmp_path, env=env)
        assert launched.returncode == 0, launched.stderr[-3000:]
        assert f"export AIFT_RECIPES_PATH={mine}" in launched.stdout
        assert f"aift train recipe={name}" in launched.stdout


def test_bad_names_unknown_tasks_and_existing_folders_are_refused_in_one_line(tmp_path, capsys):
    mine = tmp_path / "mine"
    for args, expected in [
        (["Demo", "--task", "causal_lm"], "recipe name 'Demo' is not valid"),
        (["plastic_sorting", "--task", "causal_lm"], "recipe name 'plastic_sorting' is taken"),
        (["json", "--task", "causal_lm"], "is the name of an importable Python module"),
    ]:
        code, out, err = new(capsys, *args, "--to", str(mine))
        assert code != 0 and expected in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not mine.exists()  # nothing written by a refusal

    with pytest.raises(SystemExit):  # argparse names the valid tasks
        main(["recipes", "new", "demo", "--task", "segmentation", "--to", str(mine)])
    assert "invalid choice: 'segmentation'" in capsys.readouterr().err

    (mine / "demo").mkdir(parents=True)
    (mine / "demo" / "mine.txt").write_text("keep")
    code, out, err = new(capsys, "demo", "--task", "causal_lm", "--to", str(mine))
    assert code != 0 and f"would overwrite {mine / 'demo'}" in err, err
    assert [p.name for p in (mine / "demo").iterdir()] == ["mine.txt"]
    assert (mine / "demo" / "mine.txt").read_text() == "keep"


def test_the_default_folder_is_recipes_local(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = new(capsys, "demo_default", "--task", "image_classification")
    assert code == 0, err
    assert (tmp_path / "recipes_local" / "demo_default" / "configs" / "recipe" / "demo_default.yaml").is_file()


def test_the_templates_refuse_bad_data_in_one_line_naming_the_file(tmp_path, monkeypatch):
    """Each template's own checks (in this process: the written modules imported from the folder)."""
    import importlib

    from aifactory_train.catalogue.new import new_recipe
    from aifactory_train.errors import DataError

    mine = tmp_path / "mine"
    for name, task in [("tpl_err_cls", "image_classification"), ("tpl_err_det", "object_detection"),
                       ("tpl_err_lm", "causal_lm")]:
        new_recipe(name, task, mine)
    monkeypatch.syspath_prepend(str(mine))

    for name in ("tpl_err_cls", "tpl_err_det", "tpl_err_lm"):  # a data.root that is not there: how to make one
        config = importlib.import_module(f"{name}.config")
        with pytest.raises(DataError, match=f"does not exist.*aift data synth {name} --out"):
            config.DataConfig(root=str(tmp_path / "nowhere")).check_files()

    cls = importlib.import_module("tpl_err_cls.synth").synthesize(tmp_path / "cls", size=6)
    (cls / "val" / "purple").mkdir()
    datamodule = importlib.import_module("tpl_err_cls.data").TplErrClsDataModule(root=str(cls))
    with pytest.raises(DataError, match=r"purple.*class 'purple' is not in train"):
        datamodule.setup("fit")

    det = importlib.import_module("tpl_err_det.synth").synthesize(tmp_path / "det", size=2)
    labels = det / "val" / "labels.jsonl"
    labels.write_text(labels.read_text() + '{"image": "x.png", "boxes": [[5, 5, 1, 1]], "labels": ["square"]}\n')
    datamodule = importlib.import_module("tpl_err_det.data").TplErrDetDataModule(root=str(det))
    with pytest.raises(DataError, match=rf"'{labels}' line 2: expected .* x1 < x2"):
        datamodule.setup("fit")

    new_recipe("tpl_err_fc", "forecasting", mine)
    fc = importlib.import_module("tpl_err_fc.synth").synthesize(tmp_path / "fc", size=1)
    series = fc / "series.csv"
    lines = series.read_text().splitlines()
    lines[3] = lines[3].replace("+01:00", "")
    series.write_text("\n".join(lines) + "\n")
    datamodule = importlib.import_module("tpl_err_fc.data").TplErrFcDataModule(root=str(fc))
    with pytest.raises(DataError, match=rf"'{series}' line 4 column 'timestamp': .* has no time zone"):
        datamodule.setup("fit")

    lm = importlib.import_module("tpl_err_lm.synth").synthesize(tmp_path / "lm", size=4)
    (lm / "val.jsonl").write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    datamodule = importlib.import_module("tpl_err_lm.data").TplErrLmDataModule(root=str(lm))
    with pytest.raises(DataError, match=r"val.jsonl' line 2: expected one object"):
        datamodule.setup("fit")
