"""ONNX export of an energy_forecasting model for a small controller: ``model.onnx`` + ``model.json``.

The graph has a fixed history and horizon (``data.history``, ``data.horizon``; the batch of series is free):

- ``past`` float32 (N, history, P): per step, in ``model.json`` ``features.past`` order: the scaled target
  ((value - mean) / std of the series), 1 where a target value is present (0: a gap, its scaled value 0), the
  observed-only covariates, the known covariates (each scaled with ``scaling.covariates``), the calendar features
  (local time, ``timezone``);
- ``future`` float32 (N, horizon, F): the known covariates and calendar features of the steps to forecast;
- ``loc``, ``scale`` float32 (N): the series' mean and std (``scaling.target``).

It returns ``quantiles`` float32 (N, horizon, Q) in the target's units, Q = ``quantiles``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .frames import CALENDAR


class DeployableForecaster(torch.nn.Module):
    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, past, future, loc, scale):
        return self.net(past, future) * scale[:, None, None] + loc[:, None, None]


def export_onnx(module, out_dir: Path, options: dict[str, Any]) -> list[Path]:
    opset = int(options.get("opset", 17))  # validated by the schema (config.py: EnergyExportOptions)
    info = module.hparams.data_info
    out_dir.mkdir(parents=True, exist_ok=True)
    history, horizon = int(info["history"]), int(info["horizon"])
    past_n, future_n = len(info["features"]["past"]), len(info["features"]["future"])
    model = DeployableForecaster(module.net.eval().cpu().float()).eval()
    example = (torch.zeros(2, history, past_n), torch.zeros(2, horizon, future_n), torch.zeros(2), torch.ones(2))
    onnx_path = out_dir / "model.onnx"
    # the TorchScript-based exporter, as the other recipes: no extra packages; the network is plain Linear/pool ops
    torch.onnx.export(model, example, str(onnx_path), dynamo=False, opset_version=opset,
                      input_names=["past", "future", "loc", "scale"], output_names=["quantiles"],
                      dynamic_axes={"past": {0: "series"}, "future": {0: "series"}, "loc": {0: "series"},
                                    "scale": {0: "series"}, "quantiles": {0: "series"}})
    meta = {
        "format": "onnx",
        "model": module.hparams.model["name"],
        "quantiles": [float(q) for q in module.hparams.loss["quantiles"]],
        "history": history, "horizon": horizon, "frequency": info["frequency"], "timezone": info["timezone"],
        "features": info["features"],
        "known_covariates": info["known_covariates"], "observed_covariates": info["observed_covariates"],
        "calendar": {"features": list(CALENDAR), "definition": "local time in `timezone`: sin/cos of hour/24, sin/cos "
                     "of weekday/7 (Monday 0), weekend 1/0"},
        "scaling": {**info["scaling"], "definition": "(x - mean) / std; fitted on the training rows only"},
        "inputs": {"past": f"float32 (N, {history}, {past_n})", "future": f"float32 (N, {horizon}, {future_n})",
                   "loc": "float32 (N): scaling.target[series][0]", "scale": "float32 (N): scaling.target[series][1]"},
        "outputs": {"quantiles": f"float32 (N, {horizon}, {len(module.hparams.loss['quantiles'])}) in target units"},
    }
    meta_path = out_dir / "model.json"
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return [onnx_path, meta_path]
