"""Data sovereignty: the libraries' usage telemetry to outside services is off in every aift process.

Each library has its own switch. The environment variables are set (whatever the environment said) before the
libraries are imported, as huggingface_hub reads them at import; child processes (DDP ranks, DataLoader workers)
inherit them. onnxruntime has no environment switch: its telemetry events (with a device id) are switched off
where aift imports it, through :func:`import_onnxruntime`. Lightning, torch and DeepSpeed send none.
"""

from __future__ import annotations

import os

TELEMETRY_OFF = {
    "MLFLOW_DISABLE_TELEMETRY": "true",  # MLflow 3 reports usage to an outside service unless told not to
    "HF_HUB_DISABLE_TELEMETRY": "1",  # huggingface_hub, and through it transformers and datasets
    "DO_NOT_TRACK": "true",  # the cross-tool convention (https://consoledonottrack.com); MLflow and HF read it too
}


def switch_off_telemetry() -> None:
    # set, not defaulted: an inherited MLFLOW_DISABLE_TELEMETRY=false must not send a hospital's usage out
    os.environ.update(TELEMETRY_OFF)


def import_onnxruntime():
    """``onnxruntime``, with its telemetry events switched off."""
    import onnxruntime

    onnxruntime.disable_telemetry_events()
    return onnxruntime


def onnx_session(files):
    """A CPU onnxruntime session of the ``.onnx`` file among an export's ``files`` (a recipe's ChecksExport)."""
    from pathlib import Path

    onnx_file = next(Path(f) for f in files if Path(f).suffix == ".onnx")
    return import_onnxruntime().InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
