"""The typed schema of infrastructure_segmentation's config (configs/recipe, configs/data).

Validated by `aift train` before any data is read; no torch or rasterio import here, so it stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from aifactory_train.recipe import (DataError, ExportOptions, OptimConfig, PredictOptions, RunConfig, check,
                                     check_choice, missing_data_root)

FORMATS = ("folders", "geotiff", "vector")
ARCHS = ("unet", "fpn", "deeplabv3plus")
REQUIRED_SPLITS = ("train", "val")
OPTIONAL_SPLITS = ("test",)
# the folder of each layout inside a split folder (see data.py)
LAYOUT_FOLDERS = {"folders": "images", "geotiff": "rasters", "vector": "rasters"}


def check_data_files(root: str | Path, format: str) -> None:
    """The data root and each required split's folder are there (before a job starts or is queued, and again by the
    DataModule); what they hold is checked when data.py reads them."""
    root = Path(root)
    if not root.is_dir():
        raise missing_data_root(root, "infrastructure_segmentation")
    for split in REQUIRED_SPLITS:
        folder = root / split / LAYOUT_FOLDERS[format]
        if not folder.is_dir():
            raise DataError(f"data.root '{root}': missing folder '{split}/{LAYOUT_FOLDERS[format]}/' for "
                            f"data.format={format} (need it for the splits {', '.join(REQUIRED_SPLITS)})")


@dataclass
class AugmentConfig:
    hflip: bool = True
    vflip: bool = True
    rotate90: bool = True
    brightness: float = 0.1


@dataclass
class DataConfig:
    _target_: str = f"{__package__}.data.InfrastructureSegmentationDataModule"
    root: str = "data/infrastructure_segmentation"
    format: str = "geotiff"
    classes: List[str] = field(default_factory=list)  # the recipe config names the demo data's
    class_field: str = "class"           # vector: the polygon attribute that holds the class name
    ignore_index: int = 255              # mask value (and nodata) left out of the loss and the metrics
    tile_size: int = 64
    train_tiles: int = 256               # random windows per training epoch (geotiff/vector and folders)
    mean: List[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: List[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])
    batch_size: int = 16
    num_workers: int = 2
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def check(self) -> None:
        check_choice("data.format", self.format, FORMATS)
        check(len(self.classes) >= 2 and len(set(self.classes)) == len(self.classes), "data.classes", self.classes,
              "at least two distinct class names, background first")
        check(0 <= self.ignore_index <= 255 and self.ignore_index >= len(self.classes), "data.ignore_index",
              self.ignore_index, f"an integer in [{len(self.classes)}, 255] (not a class index)")
        check(self.tile_size >= 32 and self.tile_size % 32 == 0, "data.tile_size", self.tile_size,
              "a multiple of 32, >= 32 (the encoder halves it five times)")
        check(self.train_tiles >= 1, "data.train_tiles", self.train_tiles, "an integer >= 1")
        for key in ("mean", "std"):
            check(len(getattr(self, key)) == 3, f"data.{key}", getattr(self, key), "three values (R, G, B)")
        check(all(s > 0 for s in self.std), "data.std", self.std, "positive values")
        check(self.batch_size >= 1, "data.batch_size", self.batch_size, "an integer >= 1")
        check(self.num_workers >= 0, "data.num_workers", self.num_workers, "an integer >= 0")

    def check_files(self, stage: str = "fit") -> None:
        check_data_files(self.root, self.format)


@dataclass
class ModelConfig:
    task: str = "semantic_segmentation"
    name: str = "unet"  # the smp architecture: unet | fpn | deeplabv3plus
    encoder: str = "resnet18"
    encoder_depth: int = 5
    decoder_channels: List[int] = field(default_factory=lambda: [128, 64, 32, 16, 8])
    weights_path: Optional[str] = None  # a local state_dict of the encoder (or the whole net); nothing is downloaded
    channels_last: Any = "auto"
    compile: bool = False

    def check(self) -> None:
        check_choice("model.name", self.name, ARCHS)
        check(3 <= self.encoder_depth <= 5, "model.encoder_depth", self.encoder_depth, "3, 4 or 5")
        if self.name == "unet":
            check(len(self.decoder_channels) == self.encoder_depth, "model.decoder_channels", self.decoder_channels,
                  f"one width per encoder stage ({self.encoder_depth} for model.encoder_depth)")
        check(self.channels_last in ("auto", True, False), "model.channels_last", self.channels_last,
              "auto, true or false")


@dataclass
class LossConfig:
    class_weights: Optional[List[float]] = None  # one per data.classes entry; thin classes (cables) rare: weigh up
    dice_weight: float = 1.0                     # loss = cross-entropy + dice_weight * Dice

    def check(self) -> None:
        check(self.dice_weight >= 0, "loss.dice_weight", self.dice_weight, "a number >= 0")
        if self.class_weights is not None:
            check(all(w >= 0 for w in self.class_weights), "loss.class_weights", self.class_weights,
                  "non-negative numbers")


@dataclass
class SegmentationPredictOptions(PredictOptions):
    """`aift predict` on large rasters (predict.py): tiles blended over their overlap, one block in memory at a time."""

    tile_size: int = 256          # px per forward pass
    overlap: int = 64             # px shared by neighbouring tiles; their logits are blended over it
    block_size: int = 1024        # px of output held in memory at once
    polygon_cell_size: int = 8192  # px; areas are merged into polygons within cells this size, cut at their borders
    gdal_cache_mb: int = 256      # GDAL's block cache (its default: 5 % of the machine's memory)
    georeferenced: bool = True    # the mask and polygons in the input's CRS; a raster without a CRS is refused
    simplify: float = 0.5         # polygon simplification tolerance, CRS units
    min_area: float = 0.0         # polygons smaller than this (CRS units squared) are left out

    def check(self) -> None:
        super().check()
        check(self.tile_size >= 32 and self.tile_size % 32 == 0, "predict.tile_size", self.tile_size,
              "a multiple of 32, >= 32")
        check(0 <= self.overlap <= self.tile_size // 2, "predict.overlap", self.overlap,
              f"an integer in [0, tile_size/2] ({self.tile_size // 2})")
        check(self.block_size >= self.tile_size, "predict.block_size", self.block_size,
              f"an integer >= predict.tile_size ({self.tile_size})")
        check(self.polygon_cell_size >= 0 and self.polygon_cell_size % self.block_size == 0,
              "predict.polygon_cell_size", self.polygon_cell_size,
              f"0 (one cell: the whole raster) or a multiple of predict.block_size ({self.block_size})")
        check(self.gdal_cache_mb >= 16, "predict.gdal_cache_mb", self.gdal_cache_mb, "an integer >= 16 (MiB)")
        check(self.simplify >= 0, "predict.simplify", self.simplify, "a number >= 0")
        check(self.min_area >= 0, "predict.min_area", self.min_area, "a number >= 0")


@dataclass
class SegmentationExportOptions(ExportOptions):
    tile_size: int = 256   # the example tile for tracing; height and width stay dynamic (multiples of 32)
    overlap: int = 64      # recorded in model.json, for the tiling the caller does

    def check(self) -> None:
        super().check()
        check(self.tile_size >= 32 and self.tile_size % 32 == 0, "export.tile_size", self.tile_size,
              "a multiple of 32, >= 32")
        check(0 <= self.overlap < self.tile_size, "export.overlap", self.overlap,
              f"an integer in [0, export.tile_size) ({self.tile_size})")


@dataclass
class InfrastructureSegmentationConfig(RunConfig):
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    predict: SegmentationPredictOptions = field(default_factory=SegmentationPredictOptions)
    export: SegmentationExportOptions = field(default_factory=SegmentationExportOptions)

    def check(self) -> None:
        if self.loss.class_weights is not None:
            check(len(self.loss.class_weights) == len(self.data.classes), "loss.class_weights",
                  self.loss.class_weights, f"one weight per class in data.classes ({len(self.data.classes)})")
