"""The energy_forecasting LightningModule: quantile forecasts trained with the pinball loss, and in the test stage
an honest rolling-origin backtest against the seasonal-naive baselines computed in the same run.

Test metrics (logged and written to ``<run dir>/reports``): MAE and RMSE of the median, pinball loss per quantile,
the empirical coverage of the outer interval (10-90 % with the default quantiles), and the skill
``1 - MAE(model) / MAE(baseline)`` against "same local time yesterday" and "same local time last week". Every
figure is computed on the same points: measured (not filled) targets where both baselines have a value.
Plots: fan charts of sample series, error by horizon step, coverage by horizon step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from aifactory_train.recipe import build_optimizer, planned_optimizer_steps, warmup_cosine
from .model import QuantileForecaster, pinball


def backtest_metrics(pred: np.ndarray, truth: np.ndarray, baselines: np.ndarray, scored: np.ndarray,
                     quantiles: list[float]) -> dict[str, Any]:
    """pred (N, h, Q), truth (N, h), baselines (N, h, 2), scored (N, h) bool -> the backtest's figures."""
    median = pred[:, :, quantiles.index(0.5)]
    m = scored
    err = median - truth
    out: dict[str, Any] = {"points": int(m.sum()), "windows": int(len(truth))}
    out["mae"] = float(np.abs(err)[m].mean())
    out["rmse"] = float(np.sqrt((err ** 2)[m].mean()))
    for j, q in enumerate(quantiles):
        diff = truth - pred[:, :, j]
        out[f"pinball_q{round(q * 100):02d}"] = float(np.maximum(q * diff, (q - 1) * diff)[m].mean())
    low, high = pred[:, :, 0], pred[:, :, -1]
    out["coverage"] = float(((truth >= low) & (truth <= high))[m].mean())
    out["coverage_nominal"] = float(quantiles[-1] - quantiles[0])
    for k, name in enumerate(("yesterday", "last_week")):
        mae = float(np.abs(baselines[:, :, k] - truth)[m].mean())
        out[f"mae_{name}"] = mae
        out[f"skill_vs_{name}"] = 1.0 - out["mae"] / mae if mae > 0 else float("nan")
    return out


class EnergyForecastingModule(L.LightningModule):
    def __init__(self, model: dict[str, Any], optim: dict[str, Any], loss: dict[str, Any], data_info: dict[str, Any],
                 fan_charts: int = 4):
        super().__init__()
        self.save_hyperparameters(logger=False)  # plain dicts: checkpoints load with weights_only=True
        self.quantiles = [float(q) for q in loss["quantiles"]]
        features = data_info["features"]
        self.net = QuantileForecaster(int(data_info["history"]), int(data_info["horizon"]), len(features["past"]),
                                      len(features["future"]), self.quantiles, hidden=int(model["hidden"]),
                                      layers=int(model["layers"]), dropout=float(model["dropout"]),
                                      pool=list(model["pool"]))
        self.register_buffer("q", torch.tensor(self.quantiles), persistent=False)
        self.outputs: list[dict[str, np.ndarray]] = []
        self.flops_per_sample: int | None = None

    def forward(self, past: torch.Tensor, future: torch.Tensor) -> torch.Tensor:
        return self.net(past, future)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            from lightning.fabric.utilities.throughput import measure_flops

            info = self.hparams.data_info
            h, f = int(info["history"]), int(info["horizon"])
            with torch.device("meta"):
                net = QuantileForecaster(h, f, len(info["features"]["past"]), len(info["features"]["future"]),
                                         self.quantiles, int(self.hparams.model["hidden"]),
                                         int(self.hparams.model["layers"]), 0.0, list(self.hparams.model["pool"]))
                past = torch.empty(2, h, len(info["features"]["past"]))
                future = torch.empty(2, f, len(info["features"]["future"]))
            self.flops_per_sample = measure_flops(net, lambda: net(past, future), loss_fn=torch.Tensor.sum) // 2

    # -- steps -----------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        pred = self(batch["past"], batch["future"])
        loss = pinball(pred, batch["target"], batch["mask"], self.q)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        pred = self(batch["past"], batch["future"])
        self.log("val/loss", pinball(pred, batch["target"], batch["mask"], self.q), prog_bar=True)
        median = pred[:, :, self.quantiles.index(0.5)] * batch["scale"][:, None] + batch["loc"][:, None]
        err = (median - batch["truth"]).abs() * batch["scored"]
        self.log("val/mae", err.sum() / batch["scored"].sum().clamp_min(1))

    def test_step(self, batch, batch_idx):
        pred = self(batch["past"], batch["future"]).float()
        pred = pred * batch["scale"][:, None, None] + batch["loc"][:, None, None]
        self.outputs.append({k: v.cpu().numpy() for k, v in {
            "pred": pred, "truth": batch["truth"], "baselines": batch["baselines"], "scored": batch["scored"],
            "series": batch["series"], "origin": batch["origin"]}.items()})

    def on_test_epoch_start(self) -> None:
        self.outputs = []

    def on_test_epoch_end(self) -> None:
        if not self.outputs:
            return
        joined = {k: np.concatenate([o[k] for o in self.outputs]) for k in self.outputs[0]}
        self.outputs = []
        metrics = backtest_metrics(joined["pred"], joined["truth"], joined["baselines"], joined["scored"],
                                   self.quantiles)
        for key, value in metrics.items():
            if key not in ("points", "windows", "coverage_nominal"):
                self.log(f"test/{key}", value)
        if self.trainer.is_global_zero:
            self.write_reports(joined, metrics)

    # -- reports ---------------------------------------------------------------------------------
    def write_reports(self, joined: dict[str, np.ndarray], metrics: dict[str, Any]) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out = Path(self.trainer.default_root_dir) / "reports"
        out.mkdir(parents=True, exist_ok=True)
        pred, truth, base, m = joined["pred"], joined["truth"], joined["baselines"], joined["scored"]
        median = pred[:, :, self.quantiles.index(0.5)]
        (out / "backtest_metrics.json").write_text(json.dumps(
            {**metrics, "quantiles": self.quantiles, "splits": self.hparams.data_info.get("splits", {}),
             "gaps": self.hparams.data_info.get("gaps", {})}, indent=2) + "\n")
        steps = np.arange(1, median.shape[1] + 1)
        count = np.maximum(m.sum(0), 1)
        by_step = {
            "mae": (np.abs(median - truth) * m).sum(0) / count,
            "mae_yesterday": (np.abs(base[:, :, 0] - truth) * m).sum(0) / count,
            "mae_last_week": (np.abs(base[:, :, 1] - truth) * m).sum(0) / count,
            "coverage": (((truth >= pred[:, :, 0]) & (truth <= pred[:, :, -1])) * m).sum(0) / count,
        }
        lines = ["step," + ",".join(by_step)] + [
            f"{s}," + ",".join(f"{by_step[k][i]:.5f}" for k in by_step) for i, s in enumerate(steps)]
        (out / "backtest_by_horizon.csv").write_text("\n".join(lines) + "\n")
        files = [out / "backtest_metrics.json", out / "backtest_by_horizon.csv"]

        fig, ax = plt.subplots(figsize=(7, 4))
        for key, label in (("mae", "model (median)"), ("mae_yesterday", "naive: yesterday"),
                           ("mae_last_week", "naive: last week")):
            ax.plot(steps, by_step[key], label=label)
        ax.set_xlabel("horizon step")
        ax.set_ylabel("MAE")
        ax.set_title("error by horizon (test backtest)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "error_by_horizon.png", dpi=100)
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, by_step["coverage"], label="empirical")
        ax.axhline(metrics["coverage_nominal"], color="grey", linestyle="--", label="nominal")
        ax.set_ylim(0, 1)
        ax.set_xlabel("horizon step")
        ax.set_ylabel(f"coverage of the q{self.quantiles[0]:g}-q{self.quantiles[-1]:g} interval")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "coverage_by_horizon.png", dpi=100)
        plt.close(fig)
        names = self.hparams.data_info.get("series", [])
        charts = int(self.hparams.fan_charts)
        picks = list(dict.fromkeys(joined["series"].tolist()))[:charts]
        if picks:
            fig, axes = plt.subplots(len(picks), 1, figsize=(9, 2.4 * len(picks)), squeeze=False)
            for ax, s in zip(axes[:, 0], picks):
                rows = np.flatnonzero(joined["series"] == s)[:3]  # three consecutive origins
                for r in rows:
                    t = joined["origin"][r] / 3.6e12 + steps  # hours since the epoch, for the axis
                    ax.fill_between(t, pred[r, :, 0], pred[r, :, -1], color="tab:blue", alpha=0.25)
                    ax.plot(t, median[r], color="tab:blue")
                    ax.plot(t, truth[r], color="black", linewidth=0.8)
                ax.set_title(names[s] if s < len(names) else str(s), fontsize=9)
            axes[-1, 0].set_xlabel("hours since 1970 (UTC); band: outer quantiles, line: median, black: measured")
            fig.tight_layout()
            fig.savefig(out / "fan_charts.png", dpi=100)
            plt.close(fig)
        return files

    # -- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self):
        cfg = self.hparams.optim
        optimizer = build_optimizer(self.parameters(), cfg, {"sgd": {"nesterov": True}})
        scheduler = warmup_cosine(optimizer, lambda: planned_optimizer_steps(self.trainer), cfg["warmup_steps"],
                                  cfg["min_lr_ratio"])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- predict ---------------------------------------------------------------------------------
    PREDICT_EXTENSIONS = (".csv", ".parquet")  # long-format tables: history plus the future known covariates
    PREDICT_DRAWS = False

    def predict_files(self, files: list[Path], batch_size: int, options: dict[str, Any]):
        """One dict per series and file: the next ``horizon`` steps' quantiles (and a forecasts table, and with
        predict.plan_charging=true a battery schedule, in the output folder)."""
        from .predict import predict_files

        return predict_files(self, files, batch_size, options)

    # -- export ----------------------------------------------------------------------------------
    EXPORT_FORMATS = ("onnx",)

    def export_model(self, fmt: str, out_dir: Path, options: dict[str, Any]) -> list[Path]:
        from aifactory_train.recipe import ConfigError
        from .export import export_onnx

        if fmt != "onnx":
            raise ConfigError(f"config key 'format': energy_forecasting exports 'onnx', not '{fmt}'")
        return export_onnx(self, Path(out_dir), options)

    # what `aift export` checks the ONNX file against (ChecksExport): real windows of the split, as the graph takes them
    def parity_inputs(self, datamodule, split: str, count: int) -> dict[str, Any]:
        from aifactory_train.recipe import spread_indices

        windows = datamodule.datasets[split]
        batch = windows.__getitems__(spread_indices(len(windows), count))
        return {name: batch[name].float().numpy() for name in ("past", "future", "loc", "scale")}

    @torch.no_grad()
    def reference_outputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        from .export import DeployableForecaster

        model = DeployableForecaster(self.net.eval().cpu().float()).eval()
        return {"quantiles": model(*(torch.from_numpy(inputs[k]) for k in ("past", "future", "loc", "scale"))).numpy()}

    def exported_outputs(self, files: list[Path], inputs: dict[str, Any]) -> dict[str, Any]:
        from aifactory_train.recipe import onnx_session

        session = onnx_session(files)
        (quantiles,) = session.run(["quantiles"], inputs)
        return {"quantiles": quantiles}
