"""The typed schema of crop_detection's config (configs/recipe, configs/data, configs/model)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from aifactory_train.recipe import (ExportOptions, OptimConfig, PredictOptions, RunConfig, check, check_choice,
                                   missing_data_root)
from aifactory_train.recipe import DataError

FORMATS = ("coco", "hf")
ON_INVALID = ("error", "skip")  # as aifactory_train.records.lineage.ON_INVALID (not imported: keeps this module light)
DETECTORS = (  # keep in step with model.DETECTORS (no torch import here)
    "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn",
    "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn", "ssdlite320_mobilenet_v3_large",
)

REQUIRED_SPLITS = ("train", "val")


def check_data_files(root: str | Path, format: str, splits: Dict[str, Dict[str, str]]) -> None:
    """The files data.root and data.splits name for the required splits are there (before a job starts or is
    queued, and again by the DataModule); what they hold is checked when data.py reads them."""
    root = Path(root)
    if not root.is_dir():
        raise missing_data_root(root, "crop_detection")
    for split in REQUIRED_SPLITS:
        if format == "hf":
            metadata = root / split / "metadata.jsonl"
            if not metadata.is_file():
                raise DataError(f"data.format=hf: '{metadata}' does not exist (one line per image with "
                                f"file_name and objects: {{bbox, category}})")
            continue
        files = splits.get(split)
        if files is None:
            raise DataError(f"data.splits.{split}: no annotation file configured for a required split")
        annotations, images = root / files["annotations"], root / files["images"]
        if not annotations.is_file():
            raise DataError(f"data.splits.{split}.annotations: COCO file '{annotations}' does not exist")
        if not images.is_dir():
            raise DataError(f"data.splits.{split}.images: image folder '{images}' does not exist")


@dataclass
class AugmentConfig:
    photometric: bool = True
    scale_jitter: Optional[List[float]] = None
    hflip: bool = True
    vflip: bool = True

    def check(self) -> None:
        if self.scale_jitter is not None:
            ok = len(self.scale_jitter) == 2 and 0 < self.scale_jitter[0] <= self.scale_jitter[1]
            check(ok, "data.augment.scale_jitter", self.scale_jitter, "null or [low, high] with 0 < low <= high")


@dataclass
class DataConfig:
    _target_: str = f"{__package__}.data.CropDetectionDataModule"  # this package's, also in a copy
    root: str = "data/crop_detection"
    format: str = "coco"
    splits: Dict[str, Dict[str, str]] = field(default_factory=dict)
    class_names: List[str] = field(default_factory=list)
    batch_size: int = 4
    num_workers: int = 2
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    on_invalid: str = "error"

    def check(self) -> None:
        check_choice("data.format", self.format, FORMATS)
        check_choice("data.on_invalid", self.on_invalid, ON_INVALID)
        check(self.batch_size >= 1, "data.batch_size", self.batch_size, "an integer >= 1")
        check(self.num_workers >= 0, "data.num_workers", self.num_workers, "an integer >= 0")
        if self.format == "coco":
            for split in ("train", "val"):
                files = self.splits.get(split, {})
                check({"annotations", "images"} <= set(files), f"data.splits.{split}", files,
                      "a mapping with 'annotations' (COCO JSON) and 'images' (folder), relative to data.root")
        else:
            check(len(self.class_names) >= 1, "data.class_names", self.class_names,
                  "the class names in category-index order (format=hf stores only indices)")

    def check_files(self, stage: str = "fit") -> None:  # both stages read train and val (the class set)
        check_data_files(self.root, self.format, self.splits)


@dataclass
class ModelConfig:
    task: str = "object_detection"
    name: str = "fasterrcnn_mobilenet_v3_large_320_fpn"
    weights_path: Optional[str] = None
    backbone_weights_path: Optional[str] = None
    trainable_backbone_layers: Optional[int] = None
    min_size: Optional[int] = None
    max_size: Optional[int] = None
    anchor_sizes: Optional[List[List[int]]] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    channels_last: Any = False
    compile_backbone: bool = False

    def check(self) -> None:
        check_choice("model.name", self.name, DETECTORS)
        check(not (self.weights_path and self.backbone_weights_path), "model.backbone_weights_path",
              self.backbone_weights_path, "null when model.weights_path is set (whole-detector weights hold a backbone)")
        check(self.trainable_backbone_layers is None or self.backbone_weights_path,
              "model.trainable_backbone_layers", self.trainable_backbone_layers,
              "null without model.backbone_weights_path (a backbone trained from scratch trains whole)")
        check(self.channels_last in ("auto", True, False), "model.channels_last", self.channels_last, "auto, true or false")
        for key in ("min_size", "max_size"):
            value = getattr(self, key)
            check(value is None or value >= 32, f"model.{key}", value, "null or an integer >= 32 (pixels)")


@dataclass
class LossConfig:
    """torchvision detectors compute their own losses; nothing to configure yet."""


@dataclass
class CropPredictOptions(PredictOptions):
    score_threshold: Optional[float] = None  # boxes below this score are left out (null: recipe.module's)

    def check(self) -> None:
        super().check()
        ok = self.score_threshold is None or 0 <= self.score_threshold <= 1
        check(ok, "predict.score_threshold", self.score_threshold, "null (the recipe's) or a score in [0, 1]")


@dataclass
class CropExportOptions(ExportOptions):
    image_size: List[int] = field(default_factory=lambda: [256, 256])  # (height, width) of the ONNX tracing input

    def check(self) -> None:
        super().check()
        check(len(self.image_size) == 2 and all(side >= 32 for side in self.image_size), "export.image_size",
              self.image_size, "[height, width], each >= 32 pixels")


@dataclass
class CropDetectionConfig(RunConfig):
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    predict: CropPredictOptions = field(default_factory=CropPredictOptions)
    export: CropExportOptions = field(default_factory=CropExportOptions)
