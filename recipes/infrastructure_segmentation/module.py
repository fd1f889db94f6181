"""The infrastructure_segmentation LightningModule: an smp U-Net (or FPN / DeepLabV3+), cross-entropy + Dice with
class weights, nodata (``ignore_index``) left out of both; mIoU, per-class IoU and boundary IoU with torchmetrics,
and a per-class table in ``<run dir>/reports``.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassJaccardIndex

from aifactory_train.recipe import ConfigError, build_optimizer, planned_optimizer_steps, warmup_cosine
from .metrics import BoundaryIoU
from .model import build_net


class EvalMetrics(torch.nn.Module):
    def __init__(self, num_classes: int, ignore_index: int):
        super().__init__()
        # zero_division=nan: a class absent from both prediction and truth is left out of the mean, not scored 0
        self.iou = MulticlassJaccardIndex(num_classes, average="none", ignore_index=ignore_index,
                                          zero_division=float("nan"))
        self.boundary = BoundaryIoU(num_classes, ignore_index)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.iou.update(preds, target)
        self.boundary.update(preds, target)

    def compute_and_reset(self) -> tuple[torch.Tensor, torch.Tensor]:
        values = self.iou.compute(), self.boundary.compute()
        self.iou.reset()
        self.boundary.reset()
        return values


class InfrastructureSegmentationModule(L.LightningModule):
    def __init__(self, model: dict[str, Any], optim: dict[str, Any], loss: dict[str, Any], data_info: dict[str, Any]):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.class_names = list(data_info["class_names"])
        self.ignore_index = int(data_info["ignore_index"])
        num_classes = len(self.class_names)
        self.net = build_net(model, num_classes)
        weights = loss.get("class_weights")
        if weights is not None and len(weights) != num_classes:
            raise ConfigError(f"config key 'loss.class_weights': {weights} has {len(weights)} weights for "
                              f"{num_classes} classes ({', '.join(self.class_names)}); valid: one per class")
        self.register_buffer("class_weights", torch.tensor(weights or [1.0] * num_classes, dtype=torch.float32),
                             persistent=False)
        import segmentation_models_pytorch as smp

        self.dice = smp.losses.DiceLoss("multiclass", ignore_index=self.ignore_index)
        self.val_metrics = EvalMetrics(num_classes, self.ignore_index)
        self.test_metrics = EvalMetrics(num_classes, self.ignore_index)
        self.channels_last = False
        self.flops_per_sample: int | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    def setup(self, stage: str) -> None:
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        setting = self.hparams.model.get("channels_last", "auto")
        self.channels_last = on_gpu if setting == "auto" else bool(setting)
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if self.hparams.model.get("compile") and stage == "fit":
            self.net.compile()
        if stage == "fit":
            self.flops_per_sample = self.measure_flops(batch_size=2) // 2

    def measure_flops(self, batch_size: int) -> int:
        """Training FLOPs of one batch of tiles, counted on the meta device (no compute)."""
        from lightning.fabric.utilities.throughput import measure_flops

        size = int(self.hparams.data_info["tile_size"])
        with torch.device("meta"):
            net = build_net({**self.hparams.model, "weights_path": None}, len(self.class_names))
            images = torch.empty(batch_size, 3, size, size)
        return measure_flops(net, lambda: net(images), loss_fn=torch.Tensor.sum)

    # -- steps -----------------------------------------------------------------------------------
    def compute_loss(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.float(), masks, weight=self.class_weights, ignore_index=self.ignore_index)
        if not (masks != self.ignore_index).any():
            return ce.nan_to_num(0.0)  # a tile of nodata only: nothing to learn, and no NaN into the optimiser
        return ce + self.hparams.loss.get("dice_weight", 1.0) * self.dice(logits.float(), masks)

    def training_step(self, batch, batch_idx):
        images, masks = batch
        loss = self.compute_loss(self(images), masks)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _eval_step(self, batch, metrics: EvalMetrics, prefix: str):
        images, masks = batch
        logits = self(images)
        self.log(f"{prefix}/loss", self.compute_loss(logits, masks), prog_bar=prefix == "val")
        metrics.update(logits.argmax(dim=1), masks)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, self.test_metrics, "test")

    def on_validation_epoch_end(self) -> None:
        self._end_eval(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._end_eval(self.test_metrics, "test")

    def _end_eval(self, metrics: EvalMetrics, split: str) -> None:
        iou, boundary = metrics.compute_and_reset()
        self.log(f"{split}/miou", iou.nanmean().nan_to_num(0.0), prog_bar=True)
        self.log(f"{split}/boundary_iou", boundary.nanmean().nan_to_num(0.0))
        for name, value, band in zip(self.class_names, iou, boundary):
            if not value.isnan():
                self.log(f"{split}/iou_{name}", value)
            if not band.isnan():
                self.log(f"{split}/boundary_iou_{name}", band)
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        out = Path(self.trainer.default_root_dir) / "reports"
        out.mkdir(parents=True, exist_ok=True)
        with open(out / f"{split}_per_class_iou.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["class", "iou", "boundary_iou"])
            for name, value, band in zip(self.class_names, iou.tolist(), boundary.tolist()):
                writer.writerow([name, f"{value:.4f}", f"{band:.4f}"])

    def configure_optimizers(self):
        cfg = self.hparams.optim
        optimizer = build_optimizer(self.parameters(), cfg, {"sgd": {"nesterov": True}})
        scheduler = warmup_cosine(optimizer, lambda: planned_optimizer_steps(self.trainer), cfg["warmup_steps"],
                                  cfg["min_lr_ratio"])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- predict and export ----------------------------------------------------------------------
    PREDICT_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
    PREDICT_DRAWS = True  # predict.draw=true: an overlay PNG of a window of each raster

    def predict_files(self, files: list[Path], batch_size: int, options: dict[str, Any]):
        """One row per raster: the GeoTIFF mask, the polygons, pixel counts per class."""
        from .predict import predict_files

        return predict_files(self, files, batch_size, options)

    EXPORT_FORMATS = ("onnx",)

    def export_model(self, fmt: str, out_dir: Path, options: dict[str, Any]) -> list[Path]:
        from .export import export_onnx

        if fmt != "onnx":
            raise ConfigError(f"config key 'format': infrastructure_segmentation exports 'onnx', not '{fmt}'")
        return export_onnx(self, Path(out_dir), options)

    # what `aift export` checks the ONNX file against (ChecksExport): real tiles of the split, float32 in [0, 1]
    def parity_inputs(self, datamodule, split: str, count: int) -> torch.Tensor:
        from torchvision.transforms import v2

        from aifactory_train.recipe import spread_indices

        tiles = datamodule.dataset(split, train=False)
        return torch.stack([v2.functional.to_dtype(tiles[i][0], torch.float32, scale=True)
                            for i in spread_indices(len(tiles), count)])

    @torch.no_grad()
    def reference_outputs(self, inputs: torch.Tensor) -> dict[str, Any]:
        from .export import DeployableSegmenter

        info = self.hparams.data_info
        logits, probabilities = DeployableSegmenter(self.net.eval().cpu().float(), info["mean"], info["std"])(inputs)
        return {"logits": logits.numpy(), "probabilities": probabilities.numpy()}

    def exported_outputs(self, files: list[Path], inputs: torch.Tensor) -> dict[str, Any]:
        from aifactory_train.recipe import onnx_session

        session = onnx_session(files)
        logits, probabilities = session.run(None, {"image": inputs.numpy()})
        return {"logits": logits, "probabilities": probabilities}
