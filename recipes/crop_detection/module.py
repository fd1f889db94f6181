"""The crop_detection LightningModule: a torchvision detector, mAP/mAP@50/mAP@75 and per-class AP/recall with
torchmetrics, weed recall at IoU 0.5 and a score threshold, pictures of predictions and PR curves per class,
and ONNX export for the sprayer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torchmetrics import Metric
from torchmetrics.detection import MeanAveragePrecision
from torchvision.ops import box_iou

from aifactory_train.recipe import ConfigError
from .model import build_detector, freeze_backbone, frozen_norm_layers
from aifactory_train.recipe import build_optimizer, planned_optimizer_steps, warmup_cosine

# torchmetrics' default COCO backend is pycocotools; faster_coco_eval computes the same COCOeval numbers
# (cross-checked against pycocotools in tests/recipes/crop_detection/test_crop_detection.py) several times faster on large val sets.
MAP_BACKEND = "faster_coco_eval"
logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)  # it prints the whole COCO table at INFO
PICTURE_IMAGES = 8


def coco_map_metric(**kwargs) -> MeanAveragePrecision:
    """torchmetrics' mAP with COCO's exact IoU and recall thresholds.

    torchmetrics builds its defaults with torch.linspace in float32 (0.29 becomes 0.28999999...), so a recall
    of exactly 0.29 misses its threshold and mAP drifts from COCOeval's (by 3e-4 mAP / 3e-3 mAP@50 on the test
    data); pycocotools' float64 np.linspace values make the two agree exactly.
    """
    import numpy as np

    return MeanAveragePrecision(
        box_format="xyxy", iou_type="bbox", backend=MAP_BACKEND,
        iou_thresholds=np.linspace(0.5, 0.95, 10).tolist(), rec_thresholds=np.linspace(0.0, 1.0, 101).tolist(),
        **kwargs,
    )


class DetectionRecall(Metric):
    """Recall of one class at an IoU and score threshold: found ground-truth boxes / all of them.

    Greedy matching by score, one prediction per ground-truth box, as COCO does. torchmetrics has no
    thresholded per-class recall (its mar_* averages over IoUs and takes every score).
    """

    def __init__(self, label: int, iou_threshold: float = 0.5, score_threshold: float = 0.5):
        super().__init__()
        self.label, self.iou_threshold, self.score_threshold = label, iou_threshold, score_threshold
        self.add_state("found", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: list[dict], targets: list[dict]) -> None:
        for pred, target in zip(preds, targets):
            truth = target["boxes"][target["labels"] == self.label]
            self.total += len(truth)
            keep = (pred["labels"] == self.label) & (pred["scores"] >= self.score_threshold)
            boxes = pred["boxes"][keep][pred["scores"][keep].argsort(descending=True)]
            if len(truth) == 0 or len(boxes) == 0:
                continue
            iou = box_iou(boxes, truth)
            taken = torch.zeros(len(truth), dtype=torch.bool, device=iou.device)
            for row in iou:
                row = row.masked_fill(taken, -1)
                best = row.argmax()
                if row[best] >= self.iou_threshold:
                    taken[best] = True
            self.found += taken.sum()

    def compute(self) -> torch.Tensor:
        return self.found.float() / self.total.clamp(min=1)


class CropDetectionModule(L.LightningModule):
    def __init__(self, model: dict[str, Any], optim: dict[str, Any], loss: dict[str, Any], data_info: dict[str, Any],
                 weed_class: str = "weed", score_threshold: float = 0.5):
        super().__init__()
        self.save_hyperparameters(logger=False)  # plain dicts: checkpoints load with weights_only=True
        self.class_names = list(data_info["class_names"])
        if weed_class not in self.class_names:
            raise ConfigError(f"config key 'recipe.module.weed_class': '{weed_class}' is not a class of the data; "
                              f"classes: {self.class_names}")
        self.net = build_detector(model["name"], len(self.class_names) + 1, min_size=model.get("min_size"),
                                  max_size=model.get("max_size"), anchor_sizes=model.get("anchor_sizes"),
                                  weights_path=model.get("weights_path"), extra=model.get("extra"),
                                  backbone_weights_path=model.get("backbone_weights_path"),
                                  trainable_backbone_layers=model.get("trainable_backbone_layers"))
        # a pretrained backbone keeps its BatchNorm statistics (torchvision's FrozenBatchNorm2d, mmdetection's
        # norm_eval): detection batches are too small to re-estimate them. Eval and export clear the path and need
        # nothing: in eval mode every BatchNorm uses its stored statistics anyway
        self.frozen_norm = frozen_norm_layers(self.net) if model.get("backbone_weights_path") else []
        weed_label = self.class_names.index(weed_class) + 1
        self.metrics = torch.nn.ModuleDict({
            split: torch.nn.ModuleDict({
                "map": coco_map_metric(class_metrics=True, extended_summary=True),
                "weed_recall": DetectionRecall(weed_label, 0.5, score_threshold),
            })
            for split in ("val", "test")
        })
        self._picture_batch = None
        self.progress_bar_values = True
        self.flops_per_sample: int | None = None  # measured at the first training batch, for FLOP/s and MFU

    def setup(self, stage: str) -> None:
        # as in plastic_sorting: prog_bar values are turned into Python numbers every batch, a sync on GPUs
        trainer = self._trainer  # None when set up by hand (tests, benchmarks)
        on_gpu = trainer is not None and trainer.strategy.root_device.type == "cuda"
        self.progress_bar_values = not on_gpu
        setting = self.hparams.model.get("channels_last", False)
        if (on_gpu if setting == "auto" else bool(setting)):
            # the convolution weights go NHWC; each convolution then gives NHWC outputs (the padded input batch
            # is converted by the first one), which tensor cores prefer. Heads and RoIAlign take either layout.
            self.net = self.net.to(memory_format=torch.channels_last)
        if self.hparams.model.get("compile_backbone") and stage == "fit":
            # the backbone (+ FPN) only: it sees one padded batch shape per input size; the RPN and box heads
            # work on data-dependent numbers of proposals, which would recompile on every step
            self.net.backbone.compile()  # in place: state_dict keys stay the same

    def forward(self, images: list[torch.Tensor]):
        return self.net(images)

    def train(self, mode: bool = True):
        super().train(mode)
        for norm in self.frozen_norm:
            norm.eval()
        return self

    def on_train_batch_start(self, batch, batch_idx) -> None:
        if self.flops_per_sample is None:
            images, targets = batch
            self.flops_per_sample = self.measure_flops(tuple(images[0].shape), targets[0])

    def measure_flops(self, image_shape: tuple[int, ...], target: dict[str, torch.Tensor]) -> int:
        """Training FLOPs (forward + backward) of one image of ``image_shape``, counted with torch's
        FlopCounterMode on a fresh copy of the detector, on the module's device (a GPU counts in a moment).

        Not on the meta device, as plastic_sorting counts: a detector picks proposals by value (top-k, NMS, box
        sampling), which needs real numbers. Per image of a given size its training step does a nearly fixed
        amount of work (the RPN keeps up to ``post_nms_top_n`` proposals, the box head samples
        ``batch_size_per_image`` of them; the dense detectors score every anchor), so one image stands for the
        batch. Convolutions and matrix products count, as in every MFU figure; RoIAlign and NMS have no FLOP
        formula in torch and are left out."""
        from lightning.fabric.utilities.throughput import measure_flops

        model, device = self.hparams.model, self.device
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # the run's own random streams are left as they were
            net = build_detector(model["name"], len(self.class_names) + 1, min_size=model.get("min_size"),
                                 max_size=model.get("max_size"), anchor_sizes=model.get("anchor_sizes"),
                                 extra=model.get("extra")).to(device).train()
            if model.get("backbone_weights_path"):  # frozen stages compute no weight gradients: fewer FLOPs
                freeze_backbone(net, model.get("trainable_backbone_layers"))
            for module in net.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()  # one image: SSDlite's 1 x 1 maps would give BatchNorm one value per channel
            image = torch.rand(image_shape, device=device)
            target = {"boxes": target["boxes"].detach().float().to(device), "labels": target["labels"].to(device)}
            return measure_flops(net, lambda: net([image], [target]), loss_fn=lambda losses: sum(losses.values()))

    # -- steps -----------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        images, targets = batch
        losses = self.net(images, targets)
        loss = sum(losses.values())
        batch_size = len(images)
        self.log("train/loss", loss, prog_bar=self.progress_bar_values, batch_size=batch_size)
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        return loss

    def _eval_step(self, batch, split: str, batch_idx: int):
        images, targets = batch
        preds = self.net(images)
        self.metrics[split]["map"].update(preds, targets)
        self.metrics[split]["weed_recall"].update(preds, targets)
        if batch_idx == 0:
            self._picture_batch = ([i.detach() for i in images[:PICTURE_IMAGES]], targets[:PICTURE_IMAGES],
                                   [{k: v.detach() for k, v in p.items()} for p in preds[:PICTURE_IMAGES]])

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val", batch_idx)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test", batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")

    def _end_eval(self, split: str) -> None:
        results = self.metrics[split]["map"].compute()
        weed_recall = self.metrics[split]["weed_recall"].compute()
        for metric in self.metrics[split].values():
            metric.reset()
        self.log(f"{split}/map", results["map"], prog_bar=True)
        self.log(f"{split}/map_50", results["map_50"], prog_bar=split == "val")
        self.log(f"{split}/map_75", results["map_75"])
        self.log(f"{split}/weed_recall", weed_recall, prog_bar=split == "val")
        classes = results["classes"].tolist() if results["classes"].ndim else [int(results["classes"])]
        for i, label in enumerate(classes):
            name = self.class_names[label - 1]
            self.log(f"{split}/ap_{name}", results["map_per_class"].reshape(-1)[i])
            self.log(f"{split}/recall_{name}", results["mar_100_per_class"].reshape(-1)[i])
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        out = Path(self.trainer.default_root_dir) / "reports"
        out.mkdir(parents=True, exist_ok=True)
        files = [self.plot_pr_curves(results, classes, out / f"{split}_pr_curves.png")]
        if self._picture_batch is not None:
            picture_dir = Path(self.trainer.default_root_dir) / "predictions"
            picture_dir.mkdir(exist_ok=True)
            files.append(self.draw_predictions(picture_dir / f"{split}_step{self.global_step:06d}.png"))
        self._picture_batch = None
        self._log_pictures(files)

    # -- pictures --------------------------------------------------------------------------------
    def draw_predictions(self, path: Path) -> Path:
        """Ground truth (green) and predictions above the score threshold (red, with scores) in a grid."""
        from PIL import Image
        from torchvision.utils import draw_bounding_boxes, make_grid

        images, targets, preds = self._picture_batch
        threshold = self.hparams.score_threshold
        tiles = []
        for image, target, pred in zip(images, targets, preds):
            canvas = (image.float().clamp(0, 1) * 255).to(torch.uint8).cpu()
            names = [self.class_names[int(l) - 1] for l in target["labels"]]
            if names:  # (torchvision warns on an empty box list: negatives, an untrained model)
                canvas = draw_bounding_boxes(canvas, target["boxes"].cpu(), labels=names, colors="lime", width=2)
            keep = pred["scores"] >= threshold
            labels = [f"{self.class_names[int(l) - 1]} {float(s):.2f}"
                      for l, s in zip(pred["labels"][keep], pred["scores"][keep])]
            if labels:
                canvas = draw_bounding_boxes(canvas, pred["boxes"][keep].float().cpu(), labels=labels, colors="red",
                                             width=1)
            tiles.append(canvas)
        size = max(t.shape[-1] for t in tiles), max(t.shape[-2] for t in tiles)
        tiles = [torch.nn.functional.pad(t, (0, size[0] - t.shape[-1], 0, size[1] - t.shape[-2])) for t in tiles]
        grid = make_grid(tiles, nrow=4, padding=4)
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
        return path

    def plot_pr_curves(self, results: dict, classes: list[int], path: Path) -> Path:
        """Precision vs recall per class at IoU 0.5 (COCO's 101 recall points, all areas, 100 detections)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        precision = results["precision"]  # (iou thresholds, recall points, classes, areas, max detections)
        recall_points = torch.linspace(0, 1, precision.shape[1])
        fig, ax = plt.subplots(figsize=(5, 4))
        for i, label in enumerate(classes):
            curve = precision[0, :, i, 0, -1].cpu()
            valid = curve >= 0
            ap = float(curve[valid].mean()) if valid.any() else float("nan")
            ax.plot(recall_points[valid], curve[valid], label=f"{self.class_names[label - 1]} (AP50 {ap:.2f})")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"IoU 0.5, step {self.global_step}")
        ax.legend(loc="lower left")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def _log_pictures(self, files: list[Path]) -> None:
        from lightning.pytorch.loggers import MLFlowLogger

        for logger in self.loggers:
            if isinstance(logger, MLFlowLogger):
                for file in files:
                    logger.experiment.log_artifact(logger.run_id, str(file), "predictions")

    # -- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self):
        cfg = self.hparams.optim
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, cfg)
        scheduler = warmup_cosine(optimizer, lambda: planned_optimizer_steps(self.trainer), cfg["warmup_steps"],
                                  cfg["min_lr_ratio"])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- predict ---------------------------------------------------------------------------------
    PREDICT_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # the kinds of file `aift predict` reads
    PREDICT_DRAWS = True  # predict.draw=true: each image with its boxes, under pictures/

    def predict_files(self, files: list[Path], batch_size: int, options: dict[str, Any]):
        """One dict per image: ``file``, ``width``, ``height`` and its ``detections`` (``class``, ``category_id``
        as in the training data's COCO file, ``score``, ``bbox`` as COCO's [x, y, width, height])."""
        from .predict import predict_files

        return predict_files(self, files, batch_size, options)

    # -- export ----------------------------------------------------------------------------------
    EXPORT_FORMATS = ("onnx",)  # the format= values of `aift export`

    def export_model(self, fmt: str, out_dir: Path, options: dict[str, Any]) -> list[Path]:
        from .export import export_onnx

        if fmt != "onnx":
            raise ConfigError(f"config key 'format': crop_detection exports 'onnx', not '{fmt}'")
        return export_onnx(self, out_dir, list(options["image_size"]))

    # -- what `aift export` checks (ChecksExport) --------------------------------------------------
    def parity_inputs(self, datamodule, split: str, count: int) -> list[torch.Tensor]:
        """The first ``count`` images of ``split`` as evaluation reads them, float32 in [0, 1] (the ONNX input)."""
        from torchvision.transforms import v2

        dataset = datamodule.dataset(split, train=False)
        return [v2.functional.to_dtype(dataset[i][0], torch.float32, scale=True).as_subclass(torch.Tensor)
                for i in range(min(count, len(dataset)))]

    def _kept(self, boxes, labels, scores) -> dict[str, Any]:
        """The detections a user keeps (score >= the recommended threshold): near-zero scores may flip across the
        graph's own 0.05 cut with float noise and say nothing about the model."""
        import numpy as np

        keep = np.asarray(scores) >= self.hparams.score_threshold
        return {"boxes": np.asarray(boxes)[keep], "labels": np.asarray(labels)[keep], "scores": np.asarray(scores)[keep]}

    @staticmethod
    def _joined(per_image: list[dict[str, Any]]) -> dict[str, Any]:
        import numpy as np

        return {key: np.concatenate([d[key] for d in per_image]) for key in per_image[0]}

    @torch.no_grad()
    def reference_outputs(self, inputs: list[torch.Tensor]) -> dict[str, Any]:
        net = self.net.eval().cpu().float()
        found = [net([image])[0] for image in inputs]
        return self._joined([self._kept(f["boxes"].numpy(), f["labels"].numpy(), f["scores"].numpy()) for f in found])

    def exported_outputs(self, files: list[Path], inputs: list[torch.Tensor]) -> dict[str, Any]:
        from aifactory_train.recipe import onnx_session

        session = onnx_session(files)
        found = [session.run(["boxes", "labels", "scores"], {"image": image.numpy()}) for image in inputs]
        return self._joined([self._kept(*f) for f in found])

