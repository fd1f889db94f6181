"""The plastic_sorting LightningModule: a torchvision classifier, cross-entropy with label smoothing
(soft targets under MixUp/CutMix), AdamW/SGD with linear warmup + cosine decay, torchmetrics metrics,
and a confusion matrix + per-class table written to ``<run dir>/reports`` after validation and test.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from aifactory_train.recipe import build_torchvision_classifier
from .data import ARRAY_EXTENSIONS, IMAGE_EXTENSIONS
from aifactory_train.recipe import build_optimizer, planned_optimizer_steps, warmup_cosine


def _eval_metrics(num_classes: int, prefix: str) -> MetricCollection:
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "f1_macro": MulticlassF1Score(num_classes, average="macro"),
            "precision_per_class": MulticlassPrecision(num_classes, average=None),
            "recall_per_class": MulticlassRecall(num_classes, average=None),
            "f1_per_class": MulticlassF1Score(num_classes, average=None),
            "confusion": MulticlassConfusionMatrix(num_classes),
        },
        prefix=prefix,
    )


class PlasticSortingModule(L.LightningModule):
    def __init__(self, model: dict[str, Any], optim: dict[str, Any], loss: dict[str, Any], data_info: dict[str, Any]):
        super().__init__()
        # Plain dicts only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(logger=False)
        self.class_names = list(data_info["class_names"])
        num_classes = len(self.class_names)
        self.net = build_torchvision_classifier(
            model["name"], num_classes, in_channels=len(data_info["channels"]), weights_path=model.get("weights_path")
        )
        # Training accuracy as a running mean of per-sample correctness: MulticlassAccuracy's update calls
        # torch.bincount, which synchronises the GPU on every step (measured: -3 % eager, -10 % compiled).
        self.train_acc = MeanMetric(nan_strategy="disable")
        self.val_metrics = _eval_metrics(num_classes, "val/")
        self.test_metrics = _eval_metrics(num_classes, "test/")
        self.channels_last = False
        self.flops_per_sample: int | None = None
        self.progress_bar_values = True

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    def setup(self, stage: str) -> None:
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        setting = self.hparams.model.get("channels_last", "auto")
        self.channels_last = on_gpu if setting == "auto" else bool(setting)
        # Lightning turns every prog_bar value into a Python number after each batch (even with the bar off):
        # a GPU sync per step, measured at -2.6 % eager / -5 % compiled on an H200. On GPUs the values go to
        # the logger only (every trainer.log_every_n_steps).
        self.progress_bar_values = not on_gpu
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if self.hparams.model.get("compile") and stage == "fit":
            self.net.compile()  # in place: state_dict keys stay the same
        if stage == "fit":
            # FLOPs grow linearly with the batch; 2 samples, not 1: BatchNorm refuses a single value per channel
            self.flops_per_sample = self.measure_flops(batch_size=2) // 2

    def measure_flops(self, batch_size: int) -> int:
        """Training FLOPs (forward + backward) of one batch, counted on the meta device (no compute).

        aifactory_train.run.callbacks.TrainingThroughput turns ``flops_per_sample`` into FLOP/s and, on GPUs
        Lightning knows, MFU.
        """
        from lightning.fabric.utilities.throughput import measure_flops

        info = self.hparams.data_info
        with torch.device("meta"):
            net = build_torchvision_classifier(self.hparams.model["name"], len(self.class_names), len(info["channels"]))
            images = torch.empty(batch_size, len(info["channels"]), info["image_size"], info["image_size"])
        return measure_flops(net, lambda: net(images), loss_fn=torch.Tensor.sum)

    # -- steps -----------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        images, targets = batch
        logits = self(images)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.hparams.loss.get("label_smoothing", 0.0))
        hard = targets.argmax(dim=1) if targets.ndim == 2 else targets  # soft targets under MixUp/CutMix
        self.train_acc.update((logits.detach().argmax(dim=1) == hard).float())
        self.log("train/loss", loss, prog_bar=self.progress_bar_values)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _eval_step(self, batch, metrics: MetricCollection, prefix: str):
        images, targets = batch
        logits = self(images)
        self.log(f"{prefix}loss", F.cross_entropy(logits, targets), prog_bar=prefix == "val/" and self.progress_bar_values)
        metrics.update(logits, targets)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_metrics, "val/")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, self.test_metrics, "test/")

    def on_validation_epoch_end(self) -> None:
        self._end_eval(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._end_eval(self.test_metrics, "test")

    def _end_eval(self, metrics: MetricCollection, split: str) -> None:
        values = metrics.compute()
        metrics.reset()
        self.log(f"{split}/acc", values[f"{split}/acc"], prog_bar=True)
        self.log(f"{split}/f1_macro", values[f"{split}/f1_macro"], prog_bar=split == "val")
        for name, recall in zip(self.class_names, values[f"{split}/recall_per_class"]):
            self.log(f"{split}/recall_{name}", recall)
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        self.write_reports(values, split)

    # -- reports ---------------------------------------------------------------------------------
    def write_reports(self, values: dict[str, torch.Tensor], split: str) -> list[Path]:
        """confusion matrix PNG + per-class CSV in <run dir>/reports (overwritten each epoch)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out = Path(self.trainer.default_root_dir) / "reports"
        out.mkdir(parents=True, exist_ok=True)
        confusion = values[f"{split}/confusion"].cpu()
        support = confusion.sum(dim=1)
        table = out / f"{split}_per_class_metrics.csv"
        with open(table, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["class", "precision", "recall", "f1", "support"])
            for i, name in enumerate(self.class_names):
                writer.writerow([
                    name,
                    f"{float(values[f'{split}/precision_per_class'][i]):.4f}",
                    f"{float(values[f'{split}/recall_per_class'][i]):.4f}",
                    f"{float(values[f'{split}/f1_per_class'][i]):.4f}",
                    int(support[i]),
                ])
        n = len(self.class_names)
        fig, ax = plt.subplots(figsize=(1.0 + 0.7 * n, 0.8 + 0.7 * n))
        ax.imshow(confusion.numpy(), cmap="Blues")
        ax.set_xticks(range(n), self.class_names, rotation=45, ha="right")
        ax.set_yticks(range(n), self.class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        for r in range(n):
            for c in range(n):
                dark = confusion[r, c] > confusion.max() / 2
                ax.text(c, r, int(confusion[r, c]), ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")
        ax.set_title(f"{split} confusion matrix (step {self.global_step})")
        fig.tight_layout()
        image = out / f"{split}_confusion_matrix.png"
        fig.savefig(image, dpi=100)
        plt.close(fig)
        return [table, image]

    # -- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self):
        cfg = self.hparams.optim
        optimizer = build_optimizer(self.parameters(), cfg, {"sgd": {"nesterov": True}})
        scheduler = warmup_cosine(optimizer, lambda: planned_optimizer_steps(self.trainer), cfg["warmup_steps"],
                                  cfg["min_lr_ratio"])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- predict ---------------------------------------------------------------------------------
    PREDICT_EXTENSIONS = IMAGE_EXTENSIONS + ARRAY_EXTENSIONS  # the kinds of file `aift predict` reads
    PREDICT_DRAWS = False  # predict.draw=true is refused

    def predict_files(self, files: list[Path], batch_size: int, options: dict[str, Any]):
        """One dict per file: ``file``, ``class``, ``probability`` and ``probabilities`` (per class)."""
        from .predict import predict_files

        return predict_files(self, files, batch_size, options)

    # -- export ----------------------------------------------------------------------------------
    EXPORT_FORMATS = ("onnx",)  # the format= values of `aift export`

    def export_model(self, fmt: str, out_dir: Path, options: dict[str, Any]) -> list[Path]:
        """``format=onnx``: ``model.onnx`` (normalisation inside, softmax out) and ``model.json``."""
        from aifactory_train.recipe import ConfigError
        from .export import export_onnx

        if fmt != "onnx":
            raise ConfigError(f"config key 'format': plastic_sorting exports 'onnx', not '{fmt}'")
        return export_onnx(self, Path(out_dir))

    # -- what `aift export` checks (ChecksExport, ScoresRecords) -----------------------------------
    def _eval_images(self, datamodule, split: str, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``limit`` records of ``split`` (spread over it) as validation sees them (resized, no augmentation), float32 in
        [0, 1] as the exported model takes them, and their labels."""
        from torchvision.transforms import v2

        from aifactory_train.recipe import spread_indices

        dataset = datamodule.dataset(split, train=False)
        items = [dataset[i] for i in spread_indices(len(dataset), limit)]
        images = torch.stack([v2.functional.to_dtype(image, torch.float32, scale=True) for image, _ in items])
        return images, torch.tensor([label for _, label in items])

    def parity_inputs(self, datamodule, split: str, count: int) -> torch.Tensor:
        return self._eval_images(datamodule, split, count)[0]

    @torch.no_grad()
    def reference_outputs(self, inputs: torch.Tensor) -> dict[str, Any]:
        from .export import DeployableClassifier, training_normalisation

        mean, std = training_normalisation(self.hparams.data_info)
        logits, probabilities = DeployableClassifier(self.net.eval().cpu().float(), mean, std).eval()(inputs)
        return {"logits": logits.numpy(), "probabilities": probabilities.numpy()}

    def exported_outputs(self, files: list[Path], inputs: torch.Tensor) -> dict[str, Any]:
        from aifactory_train.recipe import onnx_session

        session = onnx_session(files)
        logits, probabilities = session.run(["logits", "probabilities"], {"image": inputs.numpy()})
        return {"logits": logits, "probabilities": probabilities}

    @torch.no_grad()
    def per_record_losses(self, datamodule, split: str, limit: int) -> list[float]:
        images, labels = self._eval_images(datamodule, split, limit)
        self.net.eval().cpu().float()
        losses = []
        for start in range(0, len(images), 32):
            batch = datamodule.normalize(images[start:start + 32] * 1.0)
            logits = self.net(batch)
            losses += F.cross_entropy(logits, labels[start:start + 32], reduction="none").tolist()
        return losses

