"""Training against a real `mlflow server` (HTTP), as on the AI Factory where runs go to a shared server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import aift


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    work = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    log = open(work / "server.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{work}/server.db", "--artifacts-destination", str(work / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, cwd=work,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
        if process.poll() is not None:
            break
    else:
        process.kill()
        pytest.fail("mlflow server did not start: " + (work / "server.log").read_text()[-2000:])
    if process.poll() is not None:
        pytest.fail("mlflow server exited: " + (work / "server.log").read_text()[-2000:])
    yield {"uri": uri, "work": work}
    process.terminate()
    process.wait(timeout=30)
    log.close()


def test_training_logs_to_a_real_mlflow_server(mlflow_server, plastic_data, tmp_path):
    result = aift("train", "recipe=plastic_sorting", "debug=smoke", "data.batch_size=16", f"data.root={plastic_data}",
                  f"tracking.uri={mlflow_server['uri']}", "tracking.experiment=server_check",
                  "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    client = MlflowClient(tracking_uri=mlflow_server["uri"])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "server_check"
    assert len(run.inputs.dataset_inputs) == 3
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    assert "reports/test_confusion_matrix.png" in artifacts
    # artifacts went through the server into its artifact store, not into the client's folder
    assert list(Path(mlflow_server["work"], "artifacts").rglob("test_confusion_matrix.png"))


SECRET = "S3cr3t-xyz"


def test_a_password_in_the_tracking_uri_is_used_and_written_nowhere(mlflow_server, plastic_data, tmp_path):
    """Train, eval, predict and export (registered) through http://alice:<password>@host: the runs are tracked
    with it, and no file the commands or the server wrote (checkpoints, ONNX, .hydra, logs, the server's store)
    and nothing they printed holds the password."""
    import base64

    port = mlflow_server["uri"].rsplit(":", 1)[1]
    uri = f"http://alice:{SECRET}@127.0.0.1:{port}"
    shown = f"http://alice:***@127.0.0.1:{port}"
    common = ["recipe=plastic_sorting", f"data.root={plastic_data}", f"tracking.uri={uri}",
              "tracking.experiment=credentials", "data.num_workers=0"]
    outputs = []

    def run(*args: str):
        result = aift(*args, cwd=tmp_path)
        outputs.append(result.stdout + result.stderr)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    run("train", *common, "debug=smoke", "data.batch_size=16", "hydra.run.dir=run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    client = MlflowClient(tracking_uri=mlflow_server["uri"])
    trained = client.get_run(summary["mlflow_run_id"])
    assert trained.info.status == "FINISHED" and trained.data.params["tracking.uri"] == shown
    assert summary["tracking_uri"] == shown
    ckpt = summary["best_checkpoint"]
    run("eval", *common, f"ckpt_path={ckpt}", "trainer.limit_test_batches=2", "hydra.run.dir=eval")
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert client.get_run(evaluated["mlflow_run_id"]).info.status == "FINISHED"
    run("predict", *common, f"ckpt_path={ckpt}", f"input={plastic_data / 'test'}", "hydra.run.dir=predict")
    run("export", *common, f"ckpt_path={ckpt}", "format=onnx", "export.register=plastic_credentials",
        "hydra.run.dir=export")
    # the export reached the training run's store with the live URI, though the checkpoint's record has no password
    assert client.get_registered_model("plastic_credentials").latest_versions
    assert any(k.startswith("aift.export.") for k in client.get_run(trained.info.run_id).data.tags)
    # an unreachable server's error names the URI, masked
    result = aift("train", *common[:2], f"tracking.uri=http://alice:{SECRET}@127.0.0.1:{free_port()}",
                  "hydra.run.dir=unreachable", cwd=tmp_path)
    outputs.append(result.stdout + result.stderr)
    assert result.returncode == 2 and f"tracking.uri '{shown[:-len(port)]}" in result.stderr

    assert f"tracking.uri={shown}" in (tmp_path / "run" / ".hydra" / "overrides.yaml").read_text()
    onnx = tmp_path / "export" / "model.onnx"
    assert onnx.is_file() and list((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    secrets = [SECRET.encode(), base64.b64encode(f"alice:{SECRET}".encode())]
    written = [p for root in (tmp_path, mlflow_server["work"]) for p in Path(root).rglob("*") if p.is_file()]
    leaks = [str(p) for p in written if any(s in p.read_bytes() for s in secrets)]
    assert not leaks, leaks
    assert not [text for text in outputs if SECRET in text]
