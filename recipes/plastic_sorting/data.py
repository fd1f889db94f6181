"""Loading plastic_sorting data: checks, HF `datasets` splits, decoding and augmentation in workers.

Two layouts:

* imagefolder — ``root/<split>/<class>/<file>`` with splits ``train``, ``val`` and optionally ``test``;
  files are PNG/JPEG (RGB) or ``.npy`` arrays of shape (bands, H, W) for multispectral data. The folders
  are scanned here rather than by HF's ``imagefolder`` builder because that builder skips ``.npy`` files and
  silently drops empty class folders; the result is the same ``datasets.Dataset`` (path + ClassLabel).
* manifest — one CSV or JSONL file per split with ``path`` (relative to root) and ``label``, read with
  ``datasets.load_dataset("csv"|"json")``.

The class set comes from the data (sorted class names of the train split) and must be the same in
every split.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from aifactory_train.errors import DataError
from aifactory_train.resume import ResumableDataLoader as DataLoader  # resumes mid-epoch (torchdata)
from aifactory_train.resume import shuffled
from aifactory_train.lineage import DatasetLineage, SplitLineage, digest_files, read_datacard
from aifactory_train.recipes.plastic_sorting.config import OPTIONAL_SPLITS, REQUIRED_SPLITS, check_data_files

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
ARRAY_EXTENSIONS = (".npy",)


def scan_imagefolder(root: Path) -> dict[str, list[tuple[str, str]]]:
    """(relative path, class name) per split, after checking the layout (that the required split folders
    exist, check_data_files has checked)."""
    splits: dict[str, list[tuple[str, str]]] = {}
    for split in REQUIRED_SPLITS + OPTIONAL_SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        class_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir())
        if not class_dirs:
            raise DataError(f"split '{split_dir}' is empty: it needs one folder per class with images in it")
        records = []
        for class_dir in class_dirs:
            files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS + ARRAY_EXTENSIONS)
            if not files:
                raise DataError(
                    f"class folder '{class_dir}' has no images ({', '.join(IMAGE_EXTENSIONS + ARRAY_EXTENSIONS)}); "
                    f"add images or remove the folder"
                )
            records += [(f.relative_to(root).as_posix(), class_dir.name) for f in files]
        splits[split] = records
    return splits


def read_manifests(root: Path, manifest: dict[str, str]) -> dict[str, list[tuple[str, str]]]:
    """(path, label) per split from CSV/JSONL manifests, read with HF datasets."""
    import datasets

    splits = {}
    for split, name in manifest.items():
        path = root / name
        if not path.is_file():
            if split in OPTIONAL_SPLITS:
                continue
            raise DataError(f"data.manifest.{split}: manifest file '{path}' does not exist")
        builder = "json" if path.suffix.lower() in (".json", ".jsonl") else "csv"
        try:
            table = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as err:  # noqa: BLE001 - a malformed file surfaces as several error types
            raise DataError(f"manifest '{path}' cannot be read as {builder}: {err}") from None
        missing = {"path", "label"} - set(table.column_names)
        if missing:
            raise DataError(f"manifest '{path}' lacks column(s) {sorted(missing)}; it has {table.column_names}")
        if len(table) == 0:
            raise DataError(f"manifest '{path}' (split '{split}') has no rows")
        records = []
        for line, (rel, label) in enumerate(zip(table["path"], table["label"]), start=2 if builder == "csv" else 1):
            if not rel or label in (None, ""):
                raise DataError(f"manifest '{path}' row {line}: empty path or label")
            if not (root / rel).is_file():
                raise DataError(f"manifest '{path}' row {line}: file '{root / rel}' does not exist")
            records.append((str(rel), str(label)))
        splits[split] = records
    return splits


def check_class_sets(splits: dict[str, list[tuple[str, str]]], root: Path) -> list[str]:
    class_names = sorted({label for _, label in splits["train"]})
    for split, records in splits.items():
        names = sorted({label for _, label in records})
        if names != class_names:
            only_train = sorted(set(class_names) - set(names))
            only_here = sorted(set(names) - set(class_names))
            raise DataError(
                f"data.root '{root}': split '{split}' has another class set than 'train' "
                f"(missing: {only_train or 'none'}; extra: {only_here or 'none'}); every split needs the same classes"
            )
    return class_names


def verify_file(path: Path, num_channels: int) -> str | None:
    """Why the file cannot be used, or None. Reads headers only (PIL verify / numpy mmap)."""
    try:
        if path.suffix.lower() in ARRAY_EXTENSIONS:
            array = np.load(path, mmap_mode="r")
            if array.ndim != 3 or array.shape[0] != num_channels:
                return f"array shape {tuple(array.shape)}, expected ({num_channels}, H, W) for data.channels"
            return None
        if num_channels != 3:
            return f"an image file holds RGB, but data.channels has {num_channels} bands: use .npy files"
        from PIL import Image

        with Image.open(path) as image:
            image.verify()
        return None
    except Exception as err:  # noqa: BLE001 - every decoder failure means "corrupt" here
        return f"{type(err).__name__}: {err}"


def load_file(path: str, num_channels: int) -> torch.Tensor:
    """uint8 (or float) tensor of shape (C, H, W)."""
    if path.endswith(ARRAY_EXTENSIONS):
        return torch.from_numpy(np.load(path))
    from torchvision.io import ImageReadMode, decode_image

    return decode_image(path, mode=ImageReadMode.RGB)


class ImageFiles(Dataset):
    """Decodes and transforms one file per item; runs inside DataLoader workers."""

    def __init__(self, root: Path, paths: list[str], labels: list[int], num_channels: int, transform):
        self.files = [str(root / p) for p in paths]
        self.labels = labels
        self.num_channels = num_channels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path = self.files[index]
        try:
            image = load_file(path, self.num_channels)
        except Exception as err:  # noqa: BLE001 - name the file, whatever the decoder raised
            raise DataError(f"cannot decode '{path}': {err} (data.on_corrupt=skip with verify_files=true leaves such files out)") from err
        return self.transform(image), self.labels[index]


class BatchMix:
    """MixUp/CutMix on a normalised training batch (torchvision transforms v2); labels become soft."""

    def __init__(self, num_classes: int, mixup_alpha: float, cutmix_alpha: float):
        choices = []
        if mixup_alpha > 0:
            choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        self.mix = v2.RandomChoice(choices)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor):
        return self.mix(images, labels)


class PlasticSortingDataModule(L.LightningDataModule):
    def __init__(
        self,
        root: str,
        format: str = "imagefolder",
        manifest: dict[str, str] | None = None,
        channels: list[str] = ("red", "green", "blue"),
        image_size: int = 64,
        mean: list[float] = (0.5, 0.5, 0.5),
        std: list[float] = (0.25, 0.25, 0.25),
        batch_size: int = 32,
        num_workers: int = 2,
        on_corrupt: str = "fail",
        verify_files: bool = True,
        augment: dict[str, Any] | None = None,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
    ):
        super().__init__()
        self.root = Path(root)
        self.format = format
        self.manifest = manifest or {}
        self.channels = list(channels)
        self.image_size = image_size
        self.mean, self.std = list(mean), list(std)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.on_corrupt = on_corrupt
        self.verify_files = verify_files
        self.augment = augment or {}
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.splits = None  # split name -> datasets.Dataset(path, label)
        self.class_names: list[str] = []
        self.skipped: list[str] = []
        self.batch_mix = None

    # -- loading ---------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return  # train/eval call setup before Lightning does; load once
        check_data_files(self.root, self.format, self.manifest)
        if self.format == "manifest":
            records = read_manifests(self.root, self.manifest)
        else:
            records = scan_imagefolder(self.root)
        self.class_names = check_class_sets(records, self.root)
        if self.verify_files:
            records = self._drop_or_fail_corrupt(records)
        import datasets

        features = datasets.Features({"path": datasets.Value("string"), "label": datasets.ClassLabel(names=self.class_names)})
        index = {name: i for i, name in enumerate(self.class_names)}
        self.splits = {
            split: datasets.Dataset.from_dict(
                {"path": [p for p, _ in rows], "label": [index[c] for _, c in rows]}, features=features, split=split
            )
            for split, rows in records.items()
        }
        if self.mixup_alpha > 0 or self.cutmix_alpha > 0:
            self.batch_mix = BatchMix(len(self.class_names), self.mixup_alpha, self.cutmix_alpha)
        sizes = ", ".join(f"{s}={len(d)}" for s, d in self.splits.items())
        log.info("data %s: %d classes %s; %s", self.root, len(self.class_names), self.class_names, sizes)

    def _drop_or_fail_corrupt(self, records):
        bad = {}
        for rows in records.values():
            for rel, _ in rows:
                reason = verify_file(self.root / rel, len(self.channels))
                if reason:
                    bad[rel] = reason
        if not bad:
            return records
        examples = "; ".join(f"{self.root / p}: {r}" for p, r in list(bad.items())[:5])
        if self.on_corrupt == "fail":
            raise DataError(
                f"{len(bad)} unreadable file(s) under data.root '{self.root}', e.g. {examples}. "
                f"Fix or remove them, or set data.on_corrupt=skip to leave them out"
            )
        self.skipped = sorted(bad)
        log.warning("data.on_corrupt=skip: leaving out %d unreadable file(s), e.g. %s", len(bad), examples)
        kept = {split: [r for r in rows if r[0] not in bad] for split, rows in records.items()}
        for split, rows in kept.items():
            if not rows:
                raise DataError(f"split '{split}' of data.root '{self.root}' has no readable files left")
        return kept

    # -- recipe contract -------------------------------------------------------------------------
    @property
    def data_info(self) -> dict[str, Any]:
        # mean/std: the normalisation the export puts inside the model
        return {"class_names": self.class_names, "channels": self.channels, "image_size": self.image_size,
                "mean": self.mean, "std": self.std}

    def has_split(self, name: str) -> bool:
        return self.splits is not None and name in self.splits

    def lineage(self) -> DatasetLineage:
        lineage = DatasetLineage(name="plastic_sorting", root=str(self.root), datacard=read_datacard(self.root),
                                 skipped_files=self.skipped)
        for split, ds in self.splits.items():
            digest = digest_files(self.root, ds["path"], ds["label"])
            lineage.splits[split] = SplitLineage(name=split, num_rows=len(ds), digest=digest, dataset=ds)
        return lineage

    # -- transforms and loaders ------------------------------------------------------------------
    # Workers decode and augment in the files' own dtype (uint8 for PNG/JPEG) and the batch travels as
    # such; scaling to float, normalising and MixUp/CutMix run after the batch reached the device. Float32
    # batches are 4x the bytes to collate, pin and copy: on an H200 that main-process work, not decoding,
    # capped the input pipeline (benchmarks/results/plastic_sorting_step_h200_2026-11-28.md).
    def transform(self, train: bool):
        size = self.image_size
        steps: list = []
        if train:
            steps.append(v2.RandomResizedCrop(size, scale=tuple(self.augment.get("scale", (0.7, 1.0))), antialias=True))
            if self.augment.get("hflip", True):
                steps.append(v2.RandomHorizontalFlip())
            if self.augment.get("vflip", True):
                steps.append(v2.RandomVerticalFlip())
            if self.augment.get("brightness", 0) > 0 and len(self.channels) == 3:
                steps.append(v2.ColorJitter(brightness=self.augment["brightness"]))
        else:
            steps.append(v2.Resize((size, size), antialias=True))
        return v2.Compose(steps)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        images = v2.functional.to_dtype(images, torch.float32, scale=True)
        return v2.functional.normalize(images, self.mean, self.std)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels = batch
        images = self.normalize(images)
        trainer = getattr(self, "trainer", None)
        if self.batch_mix is not None and trainer is not None and trainer.training:
            images, labels = self.batch_mix(images, labels)
        return images, labels

    def dataset(self, split: str, train: bool) -> ImageFiles:
        ds = self.splits[split]
        return ImageFiles(self.root, ds["path"], ds["label"], len(self.channels), self.transform(train))

    def _loader(self, split: str, train: bool) -> DataLoader:
        dataset = self.dataset(split, train)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=shuffled(dataset, self.trainer) if train else None,
            drop_last=train and len(self.splits[split]) > self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        if not self.has_split("test"):
            raise DataError(f"data.root '{self.root}' has no test split")
        return self._loader("test", train=False)
