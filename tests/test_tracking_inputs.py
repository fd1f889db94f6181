"""The data a run trained on, as MLflow dataset inputs: one per split, named <dataset>-<split>, with the split's
digest, whether or not the recipe keeps a table of its records (a Hugging Face dataset) in its lineage. A real
MLflow sqlite store; no training."""

from __future__ import annotations

from pathlib import Path

import pytest

from aifactory_train.records.lineage import DatasetLineage, SplitLineage, digest_files
from aifactory_train.records.tracking import MLFLOW_DIGEST_CHARS


@pytest.mark.parametrize("with_table", [False, True])
def test_each_split_is_an_mlflow_dataset_input_with_its_digest(with_table, tmp_path):
    from mlflow.tracking import MlflowClient

    from aifactory_train.records.tracking import Tracker

    data = tmp_path / "data"
    data.mkdir()
    splits = {}
    for split in ("train", "val"):
        (data / f"{split}.csv").write_text(f"t,v\n{split},1\n")
        table = None
        if with_table:
            import datasets

            table = datasets.Dataset.from_dict({"path": [f"{split}.csv"], "label": [0]})
        splits[split] = SplitLineage(split, 1, digest_files(data, [f"{split}.csv"], [split]), dataset=table)
    lineage = DatasetLineage("meters", str(data), splits=splits)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker = Tracker({"backend": "mlflow", "uri": uri, "experiment": "inputs", "tags": {}}, run_dir, resume=False)
    tracker.lightning_logger()
    (run_dir / "config.yaml").write_text("recipe: {name: meters}\n")
    tracker.log_run_start({"recipe": {"name": "meters"}}, run_dir / "config.yaml", lineage)
    tracker.finish("FINISHED")
    inputs = MlflowClient(uri).get_run(tracker.run_id).inputs.dataset_inputs
    logged = {d.dataset.name: d.dataset.digest for d in inputs}
    assert logged == {f"meters-{s}": splits[s].digest[:MLFLOW_DIGEST_CHARS] for s in splits}
    assert {d.tags[0].value for d in inputs} == {"train", "val"}  # mlflow.data.context
    assert all(Path(data).resolve().as_posix() in d.dataset.source for d in inputs)
