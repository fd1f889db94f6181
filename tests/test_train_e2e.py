"""End to end: `aift train` / `aift eval` in subprocesses on real files, read back from MLflow and summary.json."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import aift

SMOKE = ["recipe=plastic_sorting", "debug=smoke", "data.batch_size=16"]  # 70 train images: 4 full batches


@pytest.fixture(scope="module")
def smoke_run(plastic_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("smoke")
    uri = f"sqlite:///{work}/mlflow.db"
    result = aift("train", *SMOKE, f"data.root={plastic_data}", f"hydra.run.dir={work}/run", f"tracking.uri={uri}",
                  "tracking.system_metrics_interval_s=1", f"energy.powercap_dir={work}/no-powercap", cwd=work)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((work / "run" / "summary.json").read_text())
    return {"work": work, "run": work / "run", "uri": uri, "summary": summary, "stdout": result.stdout}


def test_summary_file_has_the_documented_keys(smoke_run):
    s = smoke_run["summary"]
    assert f"summary: {smoke_run['run'] / 'summary.json'}" in smoke_run["stdout"]
    assert s["status"] == "completed" and s["recipe"] == "plastic_sorting" and s["model"] == "resnet18"
    assert s["tracking_uri"] == smoke_run["uri"] and len(s["mlflow_run_id"]) == 32
    assert Path(s["best_checkpoint"]).is_file() and Path(s["last_checkpoint"]).is_file()
    assert s["global_step"] == 4 and s["train_samples"] == 4 * 16
    assert s["train_samples_per_s"] > 0 and s["wall_time_s"] > 0
    peak = s["peak_device_memory_gib"]  # rank 0's GPU peak, null on CPU
    assert "peak_device_memory_gib" in s and (peak is None or peak > 0)
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "val/f1_macro", "test/acc"):
        assert key in s["metrics"]
    assert set(s["dataset"]["splits"]) == {"train", "val", "test"}
    assert s["precision"] == "32-true"
    # energy.meter=auto on a CPU without a powercap counter: nothing measured, and the summary says why
    assert s["energy"]["measured"] is False and "no-powercap" in s["energy"]["reason"]
    assert s["early_stopping"] is None  # off unless early_stopping.patience is set
    assert not (smoke_run["run"] / "energy").exists()


def test_mlflow_run_has_params_metrics_inputs_tags_and_artifacts(smoke_run):
    client = MlflowClient(tracking_uri=smoke_run["uri"])
    s = smoke_run["summary"]
    run = client.get_run(s["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.name"] == "resnet18" and params["data.batch_size"] == "16" and params["seed"] == "42"
    assert params["recipe.name"] == "plastic_sorting"
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(losses) == 4 and [m.step for m in losses] == [0, 1, 2, 3]
    for metric in ("val/acc", "val/f1_macro", "test/acc", "val/recall_PET", "throughput/device/samples_per_sec",
                   "throughput/device/flops_per_sec", "system/cpu_utilization_percentage",
                   "system/system_memory_usage_megabytes"):
        assert metric in run.data.metrics, sorted(run.data.metrics)
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"plastic_sorting-train", "plastic_sorting-val", "plastic_sorting-test"}
    for split in ("train", "val", "test"):
        dataset_input = inputs[f"plastic_sorting-{split}"]
        assert dataset_input.dataset.digest == s["dataset"]["splits"][split]["digest"][:32]
        assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == split
    tags = run.data.tags
    assert tags["aift.data.digest"] == s["dataset"]["digest"]
    assert tags["aift.data.license"] == "CC0-1.0"
    assert tags["aift.version.torch"] and tags["aift.hardware.cpu_count"]
    assert tags["aift.checkpoint.best"] == s["best_checkpoint"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "environment.json", "summary.json", "reports"} <= artifacts
    reports = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    assert {"reports/val_confusion_matrix.png", "reports/test_per_class_metrics.csv"} <= reports
    env = json.loads(Path(client.download_artifacts(run.info.run_id, "environment.json", str(smoke_run["work"]))).read_text())
    assert "torch" in env["packages"] and env["hardware"]["cpu_count"] >= 1


def test_per_class_table_and_confusion_matrix_files(smoke_run):
    reports = smoke_run["run"] / "reports"
    lines = (reports / "test_per_class_metrics.csv").read_text().splitlines()
    assert lines[0] == "class,precision,recall,f1,support"
    assert [l.split(",")[0] for l in lines[1:]] == ["HDPE", "LDPE", "PET", "PP", "PS", "PVC", "other"]
    assert (reports / "val_confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_of_best_checkpoint_reproduces_test_metrics(smoke_run, plastic_data):
    s = smoke_run["summary"]
    result = aift("eval", "recipe=plastic_sorting", f"ckpt_path={s['best_checkpoint']}", f"data.root={plastic_data}",
                  "trainer.limit_test_batches=2", "data.num_workers=0", f"hydra.run.dir={smoke_run['work']}/eval",
                  f"tracking.uri={smoke_run['uri']}", cwd=smoke_run["work"])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((smoke_run["work"] / "eval" / "eval.json").read_text())
    assert report["split"] == "test" and report["checkpoint"] == s["best_checkpoint"]
    assert report["metrics"]["test/acc"] == pytest.approx(s["metrics"]["test/acc"], abs=1e-6)
    assert report["dataset"]["digest"] == s["dataset"]["digest"]
    assert report["trained_on"] == [s["dataset"]]  # what the model learned from, beside what it is scored on
    # its own MLflow run, linked to the training run that wrote the checkpoint
    run = MlflowClient(tracking_uri=smoke_run["uri"]).get_run(report["mlflow_run_id"])
    assert report["mlflow_run_id"] != s["mlflow_run_id"] and report["trained_mlflow_run_id"] == s["mlflow_run_id"]
    assert run.data.tags["aift.eval.trained_run_id"] == s["mlflow_run_id"] and run.data.tags["aift.run_kind"] == "eval"
    assert run.data.metrics["test/acc"] == pytest.approx(s["metrics"]["test/acc"], abs=1e-6)
    assert len(run.inputs.dataset_inputs) == 3


def test_eval_does_not_need_the_weights_training_started_from(plastic_data, tmp_path):
    import torch
    import torchvision

    start = tmp_path / "pretrained" / "resnet18.pt"
    start.parent.mkdir()
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), start)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    train = aift("train", *SMOKE, f"data.root={plastic_data}", f"model.weights_path={start}", "hydra.run.dir=run",
                 f"tracking.uri={uri}", "tracking.system_metrics=false", "tracking.system_metrics_interval_s=1",
                 cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    trained = MlflowClient(tracking_uri=uri).get_run(s["mlflow_run_id"])  # (and the system metrics switched off)
    assert "train/loss" in trained.data.metrics and not any(k.startswith("system/") for k in trained.data.metrics)
    start_sha256 = hashlib.sha256(start.read_bytes()).hexdigest()
    shutil.rmtree(start.parent)  # the pretrained file moved on; the checkpoint holds the trained weights
    # and the checkpoint leaves its run folder: it still says which run, data and weights made it
    moved = Path(shutil.move(s["best_checkpoint"], tmp_path / "moved.ckpt"))
    result = aift("eval", "recipe=plastic_sorting", f"ckpt_path={moved}", f"data.root={plastic_data}",
                  "hydra.run.dir=eval", f"tracking.uri={uri}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["metrics"]["test/acc"] == pytest.approx(s["metrics"]["test/acc"], abs=1e-6)
    assert report["trained_mlflow_run_id"] == s["mlflow_run_id"] and report["trained_on"] == [s["dataset"]]
    from aifactory_train.run.provenance import read_provenance

    assert read_provenance(str(moved))["starting_weights"] == {"weights_path": {"path": str(start),
                                                                                "sha256": start_sha256}}


def test_onnx_export_classifies_like_the_checkpoint(smoke_run, plastic_data):
    """The line's software gives the ONNX model resized images in [0, 1]; the normalisation is inside it. Its
    probabilities match the PyTorch module's on real test images."""
    import numpy as np
    import onnxruntime
    import torch
    from torchvision.io import read_image
    from torchvision.transforms import v2

    from aifactory_train.run.checkpoints import load_trained_module
    from aifactory_train.recipes.plastic_sorting.module import PlasticSortingModule

    s = smoke_run["summary"]
    result = aift("export", "recipe=plastic_sorting", f"ckpt_path={s['best_checkpoint']}", "format=onnx",
                  "hydra.run.dir=export", cwd=smoke_run["work"])
    assert result.returncode == 0, result.stderr[-3000:]
    out = smoke_run["work"] / "export"
    meta = json.loads((out / "model.json").read_text())
    assert meta["class_names"] == ["HDPE", "LDPE", "PET", "PP", "PS", "PVC", "other"]
    assert meta["input"]["channels"] == ["red", "green", "blue"] and meta["input"]["size_hw"] == [64, 64]
    assert meta["inside_the_model"] == {"normalize_mean": [0.5, 0.5, 0.5], "normalize_std": [0.25, 0.25, 0.25]}
    record = json.loads((out / "provenance.json").read_text())
    assert record["datasets"] == [s["dataset"]] and record["export"]["files"] == ["model.onnx", "model.json"]

    paths = [sorted((plastic_data / "test" / name).glob("*.png"))[0] for name in meta["class_names"]]
    images = torch.stack([v2.functional.resize(read_image(str(p)), [64, 64], antialias=True) for p in paths])
    images = images.float() / 255
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits, probabilities = session.run(None, {"image": images.numpy()})
    module = load_trained_module(PlasticSortingModule, s["best_checkpoint"]).eval()
    with torch.no_grad():
        reference = module(v2.functional.normalize(images, [0.5] * 3, [0.25] * 3))
    np.testing.assert_allclose(logits, reference.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(probabilities, reference.softmax(1).numpy(), atol=1e-5)
    assert json.loads(session.get_modelmeta().custom_metadata_map["aift.provenance"]) == record
    # the data owner's view: the training run says where its model went
    runs = aift("data", "runs", "recipe=plastic_sorting", f"data.root={plastic_data}", f"tracking.uri={smoke_run['uri']}",
                "--out", str(smoke_run["work"] / "runs_after_export.json"), cwd=smoke_run["work"])
    assert runs.returncode == 0, runs.stderr[-3000:]
    (trained,) = [r for r in json.loads((smoke_run["work"] / "runs_after_export.json").read_text())["runs"]
                  if r["run_id"] == s["mlflow_run_id"]]
    assert trained["exports"] == [f"onnx {out} {record['export']['exported']}"]
    assert f"exported: onnx {out}" in runs.stdout


def test_export_refuses_another_format_and_a_checkpoint_without_its_normalisation(smoke_run, tmp_path):
    import torch

    result = aift("export", "recipe=plastic_sorting", f"ckpt_path={smoke_run['summary']['best_checkpoint']}",
                  "format=hf", "hydra.run.dir=export_hf", cwd=tmp_path)
    assert result.returncode == 2 and "plastic_sorting exports 'onnx', not 'hf'" in result.stderr
    state = torch.load(smoke_run["summary"]["best_checkpoint"], map_location="cpu", weights_only=True)
    for key in ("mean", "std"):
        del state["hyper_parameters"]["data_info"][key]  # as a checkpoint written before export existed
    torch.save(state, tmp_path / "old.ckpt")
    result = aift("export", "recipe=plastic_sorting", f"ckpt_path={tmp_path / 'old.ckpt'}", "format=onnx",
                  "hydra.run.dir=export_old", cwd=tmp_path)
    assert result.returncode == 2 and "data_info.mean/std" in result.stderr
    assert not (tmp_path / "export_old" / "model.onnx").exists()


def test_data_runs_lists_the_runs_that_used_each_split(smoke_run, plastic_data, tmp_path):
    s = smoke_run["summary"]
    result = aift("data", "runs", "recipe=plastic_sorting", f"data.root={plastic_data}",
                  f"tracking.uri={smoke_run['uri']}", "--out", str(tmp_path / "runs.json"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "runs.json").read_text())
    assert report["data"]["digest"] == s["dataset"]["digest"]
    (trained,) = [r for r in report["runs"] if r["run_id"] == s["mlflow_run_id"]]
    assert trained["kind"] == "train" and trained["all_data"] and trained["splits"] == ["test", "train", "val"]
    assert trained["recipe"] == "plastic_sorting" and trained["datacard"]["license"] == "CC0-1.0"
    assert s["mlflow_run_id"] in result.stdout and "all splits" in result.stdout

    # the same images with one test image changed: the run shares the train and val splits only
    changed = Path(shutil.copytree(plastic_data, tmp_path / "changed"))
    image = sorted((changed / "test" / "PET").glob("*.png"))[0]
    image.write_bytes(image.read_bytes() + b"\0")
    result = aift("data", "runs", "recipe=plastic_sorting", f"data.root={changed}", f"tracking.uri={smoke_run['uri']}",
                  "--out", str(tmp_path / "changed.json"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (partial,) = [r for r in json.loads((tmp_path / "changed.json").read_text())["runs"]
                  if r["run_id"] == s["mlflow_run_id"]]
    assert not partial["all_data"] and partial["splits"] == ["train", "val"]


def test_data_runs_needs_an_existing_store(plastic_data, tmp_path):
    missing = tmp_path / "nowhere.db"
    result = aift("data", "runs", "recipe=plastic_sorting", f"data.root={plastic_data}",
                  f"tracking.uri=sqlite:///{missing}", cwd=tmp_path)
    assert result.returncode == 2 and f"'sqlite:///{missing}': there is no MLflow store" in result.stderr
    assert not missing.exists()  # a query does not create an empty store
    result = aift("data", "runs", "recipe=plastic_sorting", f"data.root={plastic_data}", "tracking=none", cwd=tmp_path)
    assert result.returncode == 2 and "tracking=none has none" in result.stderr


def test_predictions_on_the_test_images_give_the_accuracy_eval_reports(smoke_run, plastic_data):
    """aift predict on the test folder (no labels read) classifies each image as aift eval scores it: the share of
    predictions that name the image's class folder is eval's test/acc, to the sample."""
    s, work = smoke_run["summary"], smoke_run["work"]
    result = aift("eval", "recipe=plastic_sorting", f"ckpt_path={s['best_checkpoint']}", f"data.root={plastic_data}",
                  "data.num_workers=0", "tracking=none", "hydra.run.dir=eval-all", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = json.loads((work / "eval-all" / "eval.json").read_text())["metrics"]["test/acc"]
    result = aift("predict", "recipe=plastic_sorting", f"ckpt_path={s['best_checkpoint']}",
                  f"input={plastic_data / 'test'}", "predict.batch_size=5", "hydra.run.dir=predict", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (work / "predict" / "predictions.jsonl").read_text().splitlines()]
    images = sorted((plastic_data / "test").rglob("*.png"))
    assert [row["file"] for row in rows] == [str(p) for p in images]  # every image once, in sorted order
    assert sum(row["class"] == Path(row["file"]).parent.name for row in rows) / len(rows) == pytest.approx(accuracy,
                                                                                                           abs=1e-6)
    for row in rows:
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert row["probability"] == max(row["probabilities"].values())
    report = json.loads((work / "predict" / "predict.json").read_text())
    assert report["files"] == report["rows"] == len(images) and report["checkpoint"] == s["best_checkpoint"]
    assert report["trained_on"] == [s["dataset"]] and report["trained_mlflow_run_id"] == s["mlflow_run_id"]
    assert report["input_datacard"] == s["dataset"]["datacard"]  # the card above test/: the synthetic data's own
    assert "predicted 18 file(s), 18 row(s)" in result.stdout
    assert report["options"]["num_workers"] == 2  # the files were decoded by two worker processes; in this one:
    result = aift("predict", "recipe=plastic_sorting", f"ckpt_path={s['best_checkpoint']}",
                  f"input={plastic_data / 'test'}", "predict.batch_size=5", "predict.num_workers=0",
                  "hydra.run.dir=predict-main", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (work / "predict-main" / "predictions.jsonl").read_text() == (work / "predict" / "predictions.jsonl").read_text()


def test_predict_runs_under_the_configured_mixed_precision(smoke_run, plastic_data, tmp_path):
    """trainer.precision=bf16-mixed: the model runs under bf16 autocast (its probabilities move a little from the
    fp32 run's, the classes hardly), and predict.json says which precision and device made them."""
    checkpoint = smoke_run["summary"]["last_checkpoint"]
    runs = {}
    for precision in ("32-true", "bf16-mixed"):
        result = aift("predict", "recipe=plastic_sorting", f"ckpt_path={checkpoint}", f"input={plastic_data / 'test'}",
                      f"trainer.precision={precision}", f"hydra.run.dir={precision}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads((tmp_path / precision / "predict.json").read_text())
        assert (report["precision"], report["device"]) == (precision, "cpu")
        runs[precision] = [json.loads(line) for line in (tmp_path / precision / "predictions.jsonl").read_text().splitlines()]
    import torch

    full, mixed = (torch.tensor([list(r["probabilities"].values()) for r in runs[p]]) for p in ("32-true", "bf16-mixed"))
    assert 0 < (full - mixed).abs().max() < 0.05  # bf16 has 8 bits of mantissa: moved, not scrambled
    assert sum(a["class"] == b["class"] for a, b in zip(runs["32-true"], runs["bf16-mixed"])) >= len(full) - 2


@pytest.mark.parametrize("case", ["no such input", "empty folder", "another kind of file", "unreadable image",
                                  "other bands", "no checkpoint", "a recipe without predict", "no pictures",
                                  "a true half precision", "negative workers", "the owner's terms"])
def test_predict_refuses_bad_input_naming_it_and_writes_no_predictions(case, smoke_run, plastic_data, tmp_path):
    import numpy as np

    checkpoint = smoke_run["summary"]["last_checkpoint"]
    good = sorted((plastic_data / "test").rglob("*.png"))[:3]
    folder = tmp_path / "in"
    folder.mkdir()
    args, message = ["recipe=plastic_sorting", f"ckpt_path={checkpoint}", f"input={folder}"], None
    if case == "no such input":
        args[2], message = f"input={tmp_path / 'nope'}", f"config key 'input': '{tmp_path / 'nope'}' does not exist"
    elif case == "empty folder":
        message = f"config key 'input': the folder '{folder}' holds no files this recipe reads (.png, .jpg"
    elif case == "another kind of file":
        (folder / "notes.txt").write_text("x")
        args[2], message = f"input={folder / 'notes.txt'}", "is not a kind of file this recipe reads; valid: .png"
    elif case == "unreadable image":  # after good ones: the run stops at it, and keeps none of the results
        for path in good:
            shutil.copy(path, folder / path.name)
        (folder / "zz_broken.png").write_bytes(b"not a png")
        message = f"cannot decode '{folder / 'zz_broken.png'}'"
    elif case == "other bands":
        np.save(folder / "four_bands.npy", np.random.rand(4, 16, 16).astype(np.float32))
        message = f"'{folder / 'four_bands.npy'}' has 4 bands of shape (C, H, W); the model was trained on 3: red, green, blue"
    elif case == "no checkpoint":
        args[1], message = "ckpt_path=null", "config key 'ckpt_path': aift predict needs a checkpoint; give ckpt_path=FILE"
    elif case == "a recipe without predict":
        # every recipe here has one; a recipe copied from an older template may not
        args.append("recipe.module._target_=lightning.pytorch.LightningModule")
        message = "recipe 'plastic_sorting' has no `aift predict`; export the model"
    elif case == "a true half precision":  # the weights stay fp32; only autocast precisions fit that
        args.append("trainer.precision=bf16-true")
        message = ("config key 'trainer.precision': 'bf16-true' is not valid; expected auto, 32-true, bf16-mixed or "
                   "16-mixed")
    elif case == "negative workers":
        args.append("predict.num_workers=-1")
        message = "config key 'predict.num_workers': -1 is not valid; expected an integer >= 0"
    elif case == "no pictures":
        args.append("predict.draw=true")
        message = ("config key 'predict.draw': recipe 'plastic_sorting' draws no pictures of its predictions; "
                   "valid: predict.draw=false")
    else:  # a data card above the files (the nearest one counts) whose owner allows another purpose only
        (tmp_path / "datacard.yaml").write_text("owner: Recycling BV\nusage:\n  recipes: [crop_detection]\n")
        (folder / "line3").mkdir()
        shutil.copy(good[0], folder / "line3" / good[0].name)
        message = (f"data card '{tmp_path / 'datacard.yaml'}': usage.recipes allows ['crop_detection'], not recipe "
                   f"'plastic_sorting'")
    result = aift("predict", *args, "hydra.run.dir=out", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr, result.stderr[-2000:]
    assert not list((tmp_path / "out").glob("predictions.jsonl*")) and not (tmp_path / "out" / "predict.json").exists()


@pytest.mark.parametrize("command", ["eval", "export"])
def test_eval_and_export_without_a_checkpoint_say_so(command, plastic_data, tmp_path):
    """Their root configs' `ckpt_path: ???` does not override train.yaml's null (OmegaConf keeps a value over a later
    `???`): without this check the command failed with a TypeError deep in checkpoint loading."""
    result = aift(command, "recipe=plastic_sorting", f"data.root={plastic_data}", "tracking=none", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"config key 'ckpt_path': aift {command} needs a checkpoint; give ckpt_path=FILE" in result.stderr
    assert "Traceback" not in result.stderr


def test_eval_with_another_class_set_is_refused(smoke_run, plastic_data, tmp_path):
    data = Path(shutil.copytree(plastic_data, tmp_path / "fewer"))
    for split in ("train", "val", "test"):
        shutil.rmtree(data / split / "other")
    result = aift("eval", "recipe=plastic_sorting", f"ckpt_path={smoke_run['summary']['best_checkpoint']}",
                  f"data.root={data}", f"hydra.run.dir={tmp_path}/eval", cwd=tmp_path)
    assert result.returncode == 2
    assert "trained on 7 classes" in result.stderr and "the data has 6 classes" in result.stderr


def test_resume_from_last_continues_the_same_mlflow_run(smoke_run, plastic_data, tmp_path):
    run_dir = Path(shutil.copytree(smoke_run["run"], tmp_path / "run"))
    before = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    client = MlflowClient(tracking_uri=smoke_run["uri"])
    system_steps = [m.step for m in client.get_metric_history(smoke_run["summary"]["mlflow_run_id"],
                                                              "system/cpu_utilization_percentage")]
    result = aift("train", *SMOKE, f"data.root={plastic_data}", f"hydra.run.dir={run_dir}", "ckpt_path=last",
                  "trainer.max_epochs=2", f"tracking.uri={smoke_run['uri']}", "tracking.system_metrics_interval_s=1",
                  cwd=smoke_run["work"])
    assert result.returncode == 0, result.stderr[-3000:]
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["resumed_from"] == str(run_dir / "checkpoints" / "last.ckpt")
    assert s["global_step"] == 8 and s["train_samples"] == 4 * 16  # only the new epoch was trained
    assert s["mlflow_run_id"] == smoke_run["summary"]["mlflow_run_id"]
    history = MlflowClient(tracking_uri=smoke_run["uri"]).get_metric_history(s["mlflow_run_id"], "train/loss")
    assert sorted(m.step for m in history) == list(range(8))
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() != before
    assert client.get_run(s["mlflow_run_id"]).info.status == "FINISHED"
    # the system metrics continue after the first job's steps instead of writing over them
    resumed = [m.step for m in client.get_metric_history(s["mlflow_run_id"], "system/cpu_utilization_percentage")]
    assert system_steps and len(resumed) > len(system_steps) and len(set(resumed)) == len(resumed)


def test_a_resume_on_changed_data_keeps_the_earlier_data_in_the_checkpoints_record(smoke_run, plastic_data, tmp_path):
    """The class set must match on resume, the files need not: the weights have then learned from two datasets,
    and their record lists both, first to last, with the run each was trained in."""
    from aifactory_train.run.provenance import read_provenance

    first = smoke_run["summary"]
    record = read_provenance(first["last_checkpoint"])
    assert record["datasets"] == [first["dataset"]] and record["starting_weights"] == {}
    assert [r["mlflow_run_id"] for r in record["runs"]] == [first["mlflow_run_id"]]
    assert record["recipe"] == "plastic_sorting" and record["software"]["aifactory_train"]

    changed = Path(shutil.copytree(plastic_data, tmp_path / "changed"))
    image = sorted((changed / "train" / "PET").glob("*.png"))[0]
    image.write_bytes(image.read_bytes() + b"\0")
    run_dir = Path(shutil.copytree(smoke_run["run"], tmp_path / "run"))
    result = aift("train", *SMOKE, f"data.root={changed}", f"hydra.run.dir={run_dir}", "ckpt_path=last",
                  "trainer.max_epochs=2", "tracking=none", "run_test=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    second = json.loads((run_dir / "summary.json").read_text())
    assert second["dataset"]["digest"] != first["dataset"]["digest"]
    record = read_provenance(second["last_checkpoint"])
    assert [d["digest"] for d in record["datasets"]] == [first["dataset"]["digest"], second["dataset"]["digest"]]
    assert [(r["output_dir"], r["mlflow_run_id"]) for r in record["runs"]] == [
        (first["output_dir"], first["mlflow_run_id"]), (second["output_dir"], None)]


def test_resume_last_without_a_checkpoint_explains_hydra_run_dir(plastic_data, tmp_path):
    result = aift("train", *SMOKE, f"data.root={plastic_data}", "ckpt_path=last", "tracking=none",
                  f"hydra.run.dir={tmp_path}/fresh", cwd=tmp_path)
    assert result.returncode == 2
    assert "no checkpoint at" in result.stderr and "hydra.run.dir=" in result.stderr


def test_resume_with_a_checkpoint_of_another_class_set_is_refused(smoke_run, plastic_data, tmp_path):
    data = Path(shutil.copytree(plastic_data, tmp_path / "more"))
    from PIL import Image

    for split in ("train", "val", "test"):
        (data / split / "PLA").mkdir()
        for path in (data / split / "PET").iterdir():  # other pixels: the same image under two labels is refused
            Image.open(path).transpose(Image.Transpose.ROTATE_90).save(data / split / "PLA" / path.name)
    result = aift("train", *SMOKE, f"data.root={data}", f"ckpt_path={smoke_run['summary']['last_checkpoint']}",
                  "tracking=none", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 2 and "trained on 7 classes" in result.stderr and "PLA" in result.stderr


def test_unreachable_tracking_server_fails_before_training(plastic_data, tmp_path):
    result = aift("train", *SMOKE, f"data.root={plastic_data}", "tracking.uri=http://127.0.0.1:9",
                  f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "tracking.uri 'http://127.0.0.1:9'" in result.stderr and "cannot be reached" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_sqlite_store_in_a_missing_folder_is_refused(plastic_data, tmp_path):
    result = aift("train", *SMOKE, f"data.root={plastic_data}", f"tracking.uri=sqlite:///{tmp_path}/no/such/dir/m.db",
                  f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 2 and "does not exist" in result.stderr and "tracking=none" in result.stderr


def test_unknown_override_key_fails_without_training(tmp_path):
    result = aift("train", *SMOKE, "trainer.max_epoch=3", cwd=tmp_path)
    assert result.returncode != 0
    assert "unknown key 'trainer.max_epoch'; did you mean 'trainer.max_epochs'?" in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_wrong_type_names_the_key(tmp_path):
    result = aift("train", *SMOKE, "trainer.max_epochs=ten", cwd=tmp_path)
    assert result.returncode == 2 and "trainer.max_epochs" in result.stderr and "'ten'" in result.stderr


@pytest.mark.parametrize("command", ["train", "eval"])
@pytest.mark.parametrize("recipe", ["plastic_sorting", "crop_detection", "clinical_notes"])
def test_missing_data_is_refused_before_the_tracking_store_is_opened(recipe, command, tmp_path):
    # default tracking: the sqlite store mlflow.db in the current folder, created when the tracker opens it
    extra = ["ckpt_path=no-such.ckpt"] if command == "eval" else []  # the data is checked before the checkpoint
    result = aift(command, f"recipe={recipe}", f"data.root={tmp_path}/nothing", *extra, cwd=tmp_path)
    assert result.returncode == 2 and f"aift data synth {recipe}" in result.stderr, result.stderr[-2000:]
    assert f"{tmp_path}/nothing" in result.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_cfg_job_prints_the_composed_config_without_training(tmp_path):
    result = aift("train", *SMOKE, "model=efficientnet_b0", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "name: efficientnet_b0" in result.stdout and "max_epochs: 1" in result.stdout
    assert not (tmp_path / "outputs").exists()


def test_multirun_sweep_trains_one_job_per_point(plastic_data, tmp_path):
    result = aift("train", "-m", *SMOKE, f"data.root={plastic_data}", "tracking=none", "seed=1,2",
                  "trainer.limit_train_batches=1", "run_test=false", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = sorted((tmp_path / "sweep").glob("*/summary.json"))
    assert len(summaries) == 2
    assert {json.loads(p.read_text())["mlflow_run_id"] for p in summaries} == {None}


def test_multispectral_experiment_trains_with_four_bands(plastic_data_ms, tmp_path):
    result = aift("train", "experiment=plastic_sorting_multispectral", "debug=smoke", f"data.root={plastic_data_ms}",
                  "tracking=none", "data.batch_size=8", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    import torch

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    state = torch.load(summary["last_checkpoint"], map_location="cpu", weights_only=True)
    assert state["state_dict"]["net.conv1.weight"].shape[1] == 4
    assert state["hyper_parameters"]["data_info"]["channels"] == ["red", "green", "blue", "nir"]


def test_ddp_on_two_cpu_processes_shares_one_folder_and_one_mlflow_run(plastic_data, powercap, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = aift("train", "recipe=plastic_sorting", "debug=smoke", "data.batch_size=8", f"data.root={plastic_data}",
                  "strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", f"tracking.uri={uri}",
                  "tracking.experiment=ddp_check", "hydra.run.dir=run", f"energy.powercap_dir={powercap.root}",
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["num_processes"] == 2
    assert summary["global_step"] == 4 and summary["train_samples"] == 4 * 8 * 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["mlruns", "run"]  # one output folder (+ artifacts)
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("ddp_check").experiment_id])
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]]
    assert len(client.get_metric_history(summary["mlflow_run_id"], "train/loss")) == 4
    # both ranks share the node's CPU package counter: rank 0 alone reads it (rank 1 would count it twice)
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "run" / "energy").glob("*.json")]
    assert record["rank"] == 0 and summary["energy"]["devices"] == 1


def test_mixup_and_cutmix_train_with_soft_labels(plastic_data, tmp_path):
    result = aift("train", *SMOKE, f"data.root={plastic_data}", "data.mixup_alpha=0.2", "data.cutmix_alpha=1.0",
                  "tracking=none", "run_test=false", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["global_step"] == 4 and 0 <= summary["metrics"]["train/acc"] <= 1


def test_multirun_sweep_of_ddp_jobs_keeps_one_folder_per_point(plastic_data, tmp_path):
    """Hydra -m with DDP: each point's second rank must join that point's folder, not make its own."""
    result = aift("train", "-m", *SMOKE, f"data.root={plastic_data}", "strategy=ddp", "trainer.devices=2",
                  "trainer.accelerator=cpu", "tracking=none", "run_test=false", "seed=1,2",
                  "trainer.limit_val_batches=1", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # no stray outputs/ from a child rank
    for point in ("0", "1"):
        summary = json.loads((tmp_path / "sweep" / point / "summary.json").read_text())
        assert summary["num_processes"] == 2 and summary["output_dir"] == str(tmp_path / "sweep" / point)
        assert (tmp_path / "sweep" / point / "train_ddp_process_1.log").is_file()


def test_experiment_created_meanwhile_by_another_job_is_used(tmp_path, monkeypatch):
    """Two jobs of a sweep start on one store: both see no experiment, one creates it, and the other's create then
    fails in MLflow (UNIQUE constraint). ensure_experiment takes the one that exists instead of failing the job."""
    from mlflow.tracking import MlflowClient

    from aifactory_train.records.tracking import ensure_experiment

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    made_by_the_other_job = MlflowClient(tracking_uri=uri).create_experiment("sweep")
    real_lookup = MlflowClient.get_experiment_by_name
    lookups = []

    def not_there_yet_at_first(self, name):
        lookups.append(name)
        return None if len(lookups) == 1 else real_lookup(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", not_there_yet_at_first)
    assert ensure_experiment(uri, "sweep") == made_by_the_other_job
    assert len(lookups) == 2  # looked, tried to create (refused by the store), looked again
    assert ensure_experiment(uri, "fresh") != made_by_the_other_job  # and a new one is simply created


def test_runs_logging_the_same_dataset_at_once_all_get_it(tmp_path):
    """The jobs of a sweep log the same dataset into one experiment at the same moment. MLflow's SQL store looks
    the dataset up and then inserts it, so all but one of them hit a UNIQUE-constraint error (a sweep job on the
    local Slurm cluster died of it). Six threads with a barrier lose that race in nearly every round without the
    retry; with it every run gets its input and the dataset is stored once."""
    import threading

    from mlflow.entities import Dataset, DatasetInput, InputTag

    from aifactory_train.records.tracking import log_dataset_inputs

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    for round_ in range(3):
        experiment = client.create_experiment(f"sweep-{round_}")
        runs = [client.create_run(experiment).info.run_id for _ in range(6)]
        barrier, failures = threading.Barrier(len(runs)), []

        def log_inputs(run_id):
            dataset = Dataset(name="notes-train", digest="0123456789", source_type="local", source=str(tmp_path))
            barrier.wait()
            try:
                log_dataset_inputs(client, run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "train")])])
            except Exception as err:  # noqa: BLE001 - collected and shown below
                failures.append(f"{type(err).__name__}: {err}"[:300])

        threads = [threading.Thread(target=log_inputs, args=(run_id,)) for run_id in runs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        for run_id in runs:
            inputs = client.get_run(run_id).inputs.dataset_inputs
            assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("notes-train", "0123456789")]


def test_early_stopping_ends_the_run_when_the_monitor_stops_improving(plastic_data, tmp_path):
    """val/f1_macro (the recipe's monitor) must improve by more than 10 to count: after the first validation nothing
    can, so with patience 1 the second validation stops the run, at 2 of its 6 epochs."""
    result = aift("train", *SMOKE, f"data.root={plastic_data}", "trainer.max_epochs=6", "early_stopping.patience=1",
                  "early_stopping.min_delta=10", "tracking=none", "run_test=false", f"hydra.run.dir={tmp_path}/run",
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["global_step"] == 2 * 4 and summary["epochs"] == 2
    stop = summary["early_stopping"]
    assert stop["stopped"] and stop["reason"] == "patience_exhausted" and stop["epoch"] == 1
    assert "val/f1_macro did not improve" in stop["message"]


@pytest.mark.parametrize("profiler", ["simple", "pytorch"])
def test_a_profiled_run_keeps_its_profile_in_the_run_folder_and_mlflow(profiler, plastic_data, tmp_path):
    """trainer.profiler: Lightning's report of where the time went, as a file (Lightning's default only prints
    it); pytorch adds a Chrome/Perfetto trace (Lightning's schedule needs 5 training steps; this run has 6)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = aift("train", *SMOKE, f"data.root={plastic_data}", f"trainer.profiler={profiler}", "data.batch_size=8",
                  "trainer.limit_train_batches=6", "run_test=false", f"tracking.uri={uri}",
                  "tracking.system_metrics=false", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "run" / "profiler"
    report = (folder / "fit-profile.txt").read_text()
    assert "FIT Profiler Report" in report and "run_training_batch" in report
    traces = sorted(folder.glob("fit-*.pt.trace.json"))
    if profiler == "pytorch":
        (trace,) = traces
        events = json.loads(trace.read_text())["traceEvents"]
        assert sum(e.get("name") == "Optimizer.step#AdamW.step" for e in events) >= 3  # training steps in it
    else:
        assert not traces
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    logged = MlflowClient(tracking_uri=uri).list_artifacts(summary["mlflow_run_id"], "profiler")
    assert "profiler/fit-profile.txt" in {a.path for a in logged}


def test_an_unknown_profiler_is_refused_with_the_valid_ones(tmp_path):
    result = aift("train", *SMOKE, "trainer.profiler=nsys", "tracking=none", cwd=tmp_path)
    assert result.returncode == 2
    assert "config key 'trainer.profiler': 'nsys' is not valid; expected null, simple, advanced or pytorch" in result.stderr


def test_show_summary_prints_the_run_for_people(smoke_run):
    """What `make demo` prints at its end: the metrics, speed, energy (or why not), checkpoint and MLflow run."""
    import subprocess
    import sys

    shown = subprocess.run([sys.executable, "-m", "aifactory_train.commands.show_summary", str(smoke_run["run"] / "summary.json")],
                           capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    s = smoke_run["summary"]
    assert "== plastic_sorting / resnet18: completed in" in shown.stdout
    assert f"test/acc         {s['metrics']['test/acc']:.4f}" in shown.stdout
    assert "energy           not measured: no CPU energy counter (powercap/RAPL) in" in shown.stdout
    assert f"MLflow run       {s['mlflow_run_id']} in {smoke_run['uri']}" in shown.stdout
    assert "stopped early" not in shown.stdout
