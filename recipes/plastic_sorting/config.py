"""The typed schema of plastic_sorting's config (see configs/recipe, configs/data, configs/model).

Validated by `aift train` before any data is read; no torch import here, so it stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from aifactory_train.recipe import OptimConfig, RunConfig, check, check_choice, missing_data_root
from aifactory_train.recipe import ConfigError, DataError

FORMATS = ("imagefolder", "manifest")
ON_INVALID = ("error", "skip")  # as aifactory_train.records.lineage.ON_INVALID (not imported: keeps this module light)
REQUIRED_SPLITS = ("train", "val")
OPTIONAL_SPLITS = ("test",)


def check_data_files(root: str | Path, format: str, manifest: Dict[str, str]) -> None:
    """The data root and, per required split, its folder (imagefolder) or manifest file are there (before a job
    starts or is queued, and again by the DataModule); what they hold is checked when data.py reads them."""
    root = Path(root)
    if not root.is_dir():
        raise missing_data_root(root, "plastic_sorting")
    for split in REQUIRED_SPLITS:
        if format == "manifest":
            path = root / manifest.get(split, f"<no data.manifest.{split}>")
            if not path.is_file():
                raise DataError(f"data.manifest.{split}: manifest file '{path}' does not exist")
        elif not (root / split).is_dir():
            raise DataError(f"data.root '{root}': missing split folder '{split}/' (need {'/, '.join(REQUIRED_SPLITS)}/)")


def check_on_corrupt(value: Optional[str]) -> None:
    """data.on_corrupt was folded into data.on_invalid, which covers unreadable files and every other invalid
    record; an old command that sets it is told the new spelling rather than silently getting the default."""
    if value is not None:
        new = {"fail": "error"}.get(str(value), str(value))
        raise ConfigError(f"config key 'data.on_corrupt' ({value!r}) was replaced by data.on_invalid (error | skip), "
                          f"which covers unreadable files and every other invalid record; set "
                          f"data.on_invalid={new if new in ON_INVALID else 'error|skip'} and drop data.on_corrupt")


@dataclass
class AugmentConfig:
    hflip: bool = True
    vflip: bool = True
    scale: List[float] = field(default_factory=lambda: [0.7, 1.0])
    brightness: float = 0.2

    def check(self) -> None:
        ok = len(self.scale) == 2 and 0.0 < self.scale[0] <= self.scale[1] <= 1.0
        check(ok, "data.augment.scale", self.scale, "[low, high] with 0 < low <= high <= 1")
        check(self.brightness >= 0, "data.augment.brightness", self.brightness, "a number >= 0")


@dataclass
class DataConfig:
    _target_: str = f"{__package__}.data.PlasticSortingDataModule"  # this package's, also in a copy
    root: str = "data/plastic_sorting"
    format: str = "imagefolder"
    manifest: Dict[str, str] = field(default_factory=dict)
    channels: List[str] = field(default_factory=lambda: ["red", "green", "blue"])
    image_size: int = 64
    mean: List[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: List[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])
    batch_size: int = 32
    num_workers: int = 2
    on_invalid: str = "error"
    verify_files: bool = True
    on_corrupt: Optional[str] = None  # replaced by on_invalid; set, it is an error that says so
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0

    def check(self) -> None:
        check_choice("data.format", self.format, FORMATS)
        check_on_corrupt(self.on_corrupt)
        check_choice("data.on_invalid", self.on_invalid, ON_INVALID)
        check(len(self.channels) >= 1, "data.channels", self.channels, "a list of at least one band name")
        for key in ("mean", "std"):
            values = getattr(self, key)
            check(
                len(values) == len(self.channels),
                f"data.{key}",
                values,
                f"one value per channel ({len(self.channels)} for data.channels={self.channels})",
            )
        check(all(s > 0 for s in self.std), "data.std", self.std, "positive values")
        check(self.image_size >= 16, "data.image_size", self.image_size, "an integer >= 16")
        check(self.batch_size >= 1, "data.batch_size", self.batch_size, "an integer >= 1")
        check(self.num_workers >= 0, "data.num_workers", self.num_workers, "an integer >= 0")
        check(self.mixup_alpha >= 0, "data.mixup_alpha", self.mixup_alpha, "a number >= 0 (0 disables)")
        check(self.cutmix_alpha >= 0, "data.cutmix_alpha", self.cutmix_alpha, "a number >= 0 (0 disables)")
        if self.format == "manifest":
            check(
                {"train", "val"} <= set(self.manifest),
                "data.manifest",
                self.manifest,
                "a file for at least the train and val splits (test optional)",
            )

    def check_files(self, stage: str = "fit") -> None:  # both stages read train and val (the class set)
        check_data_files(self.root, self.format, self.manifest)


@dataclass
class ModelConfig:
    task: str = "image_classification"
    name: str = "resnet18"
    weights_path: Optional[str] = None
    channels_last: Any = "auto"
    compile: bool = False

    def check(self) -> None:
        from aifactory_train.recipe import classifier_names  # imports torchvision: only when validating

        check_choice("model.name", self.name, classifier_names())
        check(self.channels_last in ("auto", True, False), "model.channels_last", self.channels_last, "auto, true or false")


@dataclass
class LossConfig:
    label_smoothing: float = 0.0

    def check(self) -> None:
        check(0 <= self.label_smoothing < 1, "loss.label_smoothing", self.label_smoothing, "a number in [0, 1)")


@dataclass
class PlasticSortingConfig(RunConfig):
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def check(self) -> None:
        if self.optim.name == "sgd":  # module.py's SGD is Nesterov's, which torch refuses without momentum
            check(self.optim.momentum > 0, "optim.momentum", self.optim.momentum, "a number in (0, 1) with "
                  "optim.name=sgd (Nesterov momentum)")
