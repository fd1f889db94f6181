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
