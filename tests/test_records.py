"""Credentials kept out of records (aifactory_train.records.masking) and the libraries' telemetry switched off."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from aifactory_train.records.masking import connectable, redact_log_records, redact_uri, redacted


@pytest.mark.parametrize("uri, expected", [
    ("postgresql://mlflow:pw@db.internal:5432/mlflow", "postgresql://mlflow:***@db.internal:5432/mlflow"),
    ("postgresql+psycopg2://u:p%40ss@db/mlflow?sslmode=require", "postgresql+psycopg2://u:***@db/mlflow?sslmode=require"),
    ("mysql+pymysql://root:hunter2@127.0.0.1:3306/mlflow", "mysql+pymysql://root:***@127.0.0.1:3306/mlflow"),
    ("http://alice:S3cr3t-xyz@127.0.0.1:5000", "http://alice:***@127.0.0.1:5000"),
    ("https://alice:p@ss:w0rd@mlflow.example.org/", "https://alice:***@mlflow.example.org/"),  # unencoded '@'
    ("https://mlflow.example.org/?token=abc123&experiment=7", "https://mlflow.example.org/?token=***&experiment=7"),
    ("postgresql://u@db/mlflow?sslmode=require&password=pw", "postgresql://u@db/mlflow?sslmode=require&password=***"),
    ("https://h/x?X-Amz-Signature=f00&X-Amz-Credential=AK/1&api_key=k", "https://h/x?X-Amz-Signature=***&X-Amz-Credential=***&api_key=***"),
    # no credentials: unchanged
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("https://ghp_T0ken@mlflow.example.org", "https://***@mlflow.example.org"),  # a user part alone: often a token
    ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
    ("sqlite:////data/runs/mlflow.db", "sqlite:////data/runs/mlflow.db"),
    ("file:///data/mlruns", "file:///data/mlruns"),
    ("databricks", "databricks"),
    ("/data/plastic/run=3/key=value", "/data/plastic/run=3/key=value"),
    ("outputs/plastic_sorting/2026-01-01_12-00-00", "outputs/plastic_sorting/2026-01-01_12-00-00"),
    (None, None),
])
def test_redact_uri(uri, expected):
    assert redact_uri(uri) == expected
    assert redact_uri(expected) == expected  # masking twice changes nothing


def test_redacted_masks_every_string_of_a_config_and_leaves_the_rest():
    config = {"tracking": {"uri": "http://a:pw@h:5000", "tags": {"t": "x"}}, "data": {"root": "/d", "n": 3},
              "hydra": {"overrides": {"task": ["tracking.uri=postgresql://u:pw@db/m", "seed=1"]}}, "flag": None}
    assert redacted(config) == {"tracking": {"uri": "http://a:***@h:5000", "tags": {"t": "x"}},
                                "data": {"root": "/d", "n": 3},
                                "hydra": {"overrides": {"task": ["tracking.uri=postgresql://u:***@db/m", "seed=1"]}},
                                "flag": None}
    assert config["tracking"]["uri"] == "http://a:pw@h:5000"  # a copy: the live config keeps the password


@pytest.mark.parametrize("recorded, live, expected", [
    ("http://alice:***@h:5000", "http://alice:pw@h:5000", "http://alice:pw@h:5000"),  # same store: the live URI
    ("http://alice:***@h:5000", None, "http://h:5000"),  # MLflow's env variables give the credentials
    ("http://alice:***@h:5000", "http://bob:pw@other:5000", "http://h:5000"),
    ("postgresql://u:***@db/m", None, "postgresql://u@db/m"),
    ("https://h/?token=***&x=1", None, "https://h/?x=1"),
    ("sqlite:////runs/mlflow.db", "sqlite:///mlflow.db", "sqlite:////runs/mlflow.db"),
])
def test_connectable(recorded, live, expected):
    assert connectable(recorded, live) == expected


def test_log_records_are_redacted_whatever_handler_writes_them(tmp_path):
    redact_log_records()
    path = tmp_path / "x.log"
    handler = logging.FileHandler(path)
    logger = logging.getLogger("aift-test-redaction")
    logger.addHandler(handler)
    try:
        logger.warning("cannot reach %s", "http://alice:S3cr3t-xyz@127.0.0.1:5000")
        logger.warning("store postgresql://u:pw2@db/m failed")
        try:
            raise ConnectionError("no route to http://bob:pw3-in-a-traceback@10.0.0.1:5000")
        except ConnectionError:
            logger.exception("tracking failed")
    finally:
        logger.removeHandler(handler)
        handler.close()
    text = path.read_text()
    assert "S3cr3t-xyz" not in text and "pw2" not in text and "pw3-in-a-traceback" not in text
    assert "ConnectionError: no route to http://bob:***@10.0.0.1:5000" in text
    assert "http://alice:***@127.0.0.1:5000" in text and "postgresql://u:***@db/m" in text


@pytest.mark.parametrize("inherited", [{}, {"MLFLOW_DISABLE_TELEMETRY": "false", "HF_HUB_DISABLE_TELEMETRY": "0"}])
def test_aift_switches_off_the_libraries_telemetry(inherited):
    """In the process aift runs in (its real entry point, with none of the switches in the environment, or with
    them switched on): MLflow's, Hugging Face's (hub, transformers, datasets) and the DO_NOT_TRACK convention, as
    those libraries read them."""
    code = ("import json, os, sys; from aifactory_train.commands.cli import main; main(['--version']);"
            "from huggingface_hub import constants; from mlflow.telemetry.utils import is_telemetry_disabled;"
            "print(json.dumps({'hf': constants.HF_HUB_DISABLE_TELEMETRY, 'mlflow': is_telemetry_disabled(),"
            "'env': {k: os.environ.get(k) for k in ('MLFLOW_DISABLE_TELEMETRY', 'HF_HUB_DISABLE_TELEMETRY',"
            "'DO_NOT_TRACK')}}))")
    env = {k: v for k, v in os.environ.items() if k not in
           ("MLFLOW_DISABLE_TELEMETRY", "HF_HUB_DISABLE_TELEMETRY", "DISABLE_TELEMETRY", "DO_NOT_TRACK")}
    env.update(inherited)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["hf"] is True and seen["mlflow"] is True
    assert seen["env"] == {"MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "true"}
