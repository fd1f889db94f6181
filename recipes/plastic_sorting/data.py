"""Loading plastic_sorting data: checks, HF `datasets` splits, decoding and augmentation in workers.

Two layouts:

* imagefolder — ``root/<split>/<class>/<file>`` with splits ``train``, ``val`` and optionally ``test``;
  files are PNG/JPEG (RGB) or ``.npy`` arrays of shape (bands, H, W) for multispectral data. The folders
  are scanned here rather than by HF's ``imagefolder`` builder because that builder skips ``.npy`` files and
  silently drops empty class folders; the result is the same ``datasets.Dataset`` (path + ClassLabel).
* manifest — one CSV or JSONL file per split with ``path`` (relative to root) and ``label``. Every path is
  resolved (symlinks, ``..``) and must lie inside the root.

Data are checked when first read, not trusted: a file that does not decode, an array with NaN/inf or no pixels,
a file listed twice or under two labels, a validation/test file whose bytes are also in train (by the SHA-256 the
lineage digest takes anyway). ``data.on_invalid=error`` (default) stops the run naming the file; ``skip`` leaves
it out and counts it per reason (``invalid_records``, the lineage, summary.json, MLflow).

The class set comes from the data (sorted class names of the train split, after any skips) and must be the
same in every split.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from aifactory_train.recipe import DataError
from aifactory_train.recipe import DataLoader  # resumes mid-epoch (torchdata)
from aifactory_train.recipe import shuffled
from aifactory_train.recipe import (DatasetLineage, InvalidRecords, SameBytes, SplitLineage, digest_files,
                                     file_digests, inside_root, read_datacard, shared_across_splits)
from aifactory_train.recipe import withdrawn
from .config import (OPTIONAL_SPLITS, REQUIRED_SPLITS, check_data_files,
                                                           check_on_corrupt)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
ARRAY_EXTENSIONS = (".npy",)


def scan_imagefolder(root: Path, invalid: InvalidRecords | None = None) -> dict[str, list[tuple[str, str]]]:
    """(relative path, class name) per split, after checking the layout (that the required split folders
    exist, check_data_files has checked)."""
    invalid = invalid if invalid is not None else InvalidRecords()
    extensions = IMAGE_EXTENSIONS + ARRAY_EXTENSIONS
    splits: dict[str, list[tuple[str, str]]] = {}
    for split in REQUIRED_SPLITS + OPTIONAL_SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        class_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir())
        loose = sorted(p for p in split_dir.iterdir() if p.is_file() and p.suffix.lower() in extensions)
        if not class_dirs:
            if loose:
                raise DataError(
                    f"split folder '{split_dir}' holds {len(loose)} image file(s) directly (e.g. '{loose[0].name}') "
                    f"and no class folders; expected one folder per class: {split_dir}/<class>/<image> "
                    f"(e.g. {split_dir}/PET/{loose[0].name})")
            raise DataError(f"split '{split_dir}' is empty: it needs one folder per class with images in it")
        for file in loose:  # next to class folders, a file has no class: it would silently not be used
            invalid("no_class_folder", file.relative_to(root).as_posix(),
                    f"'{file}' lies directly in split folder '{split_dir}', outside any class folder; expected "
                    f"{split_dir}/<class>/{file.name}")
        records = []
        for class_dir in class_dirs:
            files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in extensions)
            if not files:
                raise DataError(
                    f"class folder '{class_dir}' has no images ({', '.join(extensions)}); "
                    f"add images or remove the folder"
                )
            for f in files:  # a symlinked file or class folder may not lead out of the dataset's root
                inside_root(root, f.relative_to(root), f"split folder '{split_dir}'")
            records += [(f.relative_to(root).as_posix(), class_dir.name) for f in files if not withdrawn(f)]
        splits[split] = records
    return splits


def _decode_utf8(path: Path, what: str) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # (a BOM, as spreadsheet programs write it, is not part of the text)
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(f"{what} '{path}' line {line}: not UTF-8 text (byte 0x{data[err.start]:02x} at column "
                        f"{column}); save the file as UTF-8") from None


def _manifest_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, row) of a CSV (rows as dicts by header) or JSONL manifest. Read here with the standard
    library rather than HF datasets so that every error can name its line."""
    import csv
    import io

    text = _decode_utf8(path, "manifest")
    if path.suffix.lower() in (".json", ".jsonl"):
        for line, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                yield line, json.loads(raw)
            except json.JSONDecodeError as err:
                raise DataError(f"manifest '{path}' line {line}: not valid JSON ({err.msg} at column {err.colno}); "
                                f"each line must be one object with 'path' and 'label'") from None
        return
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames or []
        missing = [c for c in ("path", "label") if c not in header]
        if missing:
            raise DataError(f"manifest '{path}' lacks column(s) {missing}; its header has {header} (expected the "
                            f"columns 'path' and 'label')")
        for row in reader:
            yield reader.line_num, row
    except csv.Error as err:
        raise DataError(f"manifest '{path}' line {reader.line_num}: not valid CSV ({err})") from None


def read_manifests(root: Path, manifest: dict[str, str],
                   invalid: InvalidRecords | None = None) -> dict[str, list[tuple[str, str]]]:
    """(path, label) per split from CSV/JSONL manifests; each path resolved and kept inside the data root."""
    invalid = invalid if invalid is not None else InvalidRecords()
    resolved_root = root.resolve()
    splits = {}
    for split, name in manifest.items():
        path = root / name
        if not path.is_file():
            if split in OPTIONAL_SPLITS:
                continue
            raise DataError(f"data.manifest.{split}: manifest file '{path}' does not exist")
        rows, first_line = {}, {}  # canonical path -> label, and the line it came from
        for line, row in _manifest_rows(path):
            where = f"manifest '{path}' row {line}"
            if not isinstance(row, dict):
                invalid("bad_row", f"{path}:{line}", f"{where}: a {type(row).__name__}, not an object with 'path' "
                                                     f"and 'label'")
                continue
            rel, label = row.get("path"), row.get("label")
            if isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
                invalid("missing_field", f"{path}:{line}", f"{where}: field 'label' is {label!r}; expected a "
                                                           f"class name")
                continue
            if not isinstance(rel, str) or not rel.strip():
                invalid("missing_field", f"{path}:{line}", f"{where}: field 'path' is {rel!r}; expected a file "
                                                           f"path relative to data.root")
                continue
            full = inside_root(root, rel, where)  # always refused, whatever data.on_invalid: not this dataset's data
            if withdrawn(full, row):  # a withdrawn subject or record (the card's withdrawal list)
                continue
            canonical = full.relative_to(resolved_root).as_posix()
            if not full.is_file():
                invalid("missing_file", canonical, f"{where}: file '{root / rel}' does not exist")
                continue
            label = str(label)
            if canonical in rows:
                if rows[canonical] != label:
                    # which label is right is not ours to guess: both rows go (or the run stops)
                    invalid("conflicting_labels", canonical,
                            f"{where}: file '{rel}' is listed again with label '{label}'; line "
                            f"{first_line[canonical]} gives it label '{rows[canonical]}'; expected one label per file")
                    rows[canonical] = None
                else:
                    invalid("duplicate_path", canonical, f"{where}: file '{rel}' is listed twice (also on line "
                                                         f"{first_line[canonical]}); expected each file once")
                continue
            rows[canonical], first_line[canonical] = label, line
        if not first_line:
            raise DataError(f"manifest '{path}' (split '{split}') has no rows")
        splits[split] = [(rel, label) for rel, label in rows.items() if label is not None]
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


def verify_file(path: Path, num_channels: int) -> tuple[str, str] | None:
    """(reason, why) the file cannot be used, or None. Images: headers only (PIL verify); arrays: the values too
    (NaN or inf in one band poisons every batch it is in, with no error anywhere)."""
    try:
        if path.suffix.lower() in ARRAY_EXTENSIONS:
            array = np.load(path, mmap_mode="r")
            if array.ndim != 3 or array.shape[0] != num_channels:
                return "wrong_shape", (f"array shape {tuple(array.shape)}, expected ({num_channels}, H, W) for "
                                       f"data.channels")
            if array.shape[1] == 0 or array.shape[2] == 0:
                return "empty_image", f"array shape {tuple(array.shape)} has no pixels; expected H, W >= 1"
            if array.dtype.kind in "fc":
                finite = np.count_nonzero(np.isfinite(array))
                if finite != array.size:
                    return "non_finite", (f"{array.size - finite} of {array.size} values are NaN or inf; expected "
                                          f"finite values")
            elif array.dtype.kind not in "biu":
                return "wrong_shape", f"array of dtype {array.dtype}; expected numbers (uint8, uint16 or float)"
            return None
        if num_channels != 3:
            return "wrong_shape", f"an image file holds RGB, but data.channels has {num_channels} bands: use .npy files"
        from PIL import Image

        with Image.open(path) as image:
            size = image.size
            image.verify()
        if size[0] < 1 or size[1] < 1:
            return "empty_image", f"image is {size[0]}x{size[1]} pixels; expected at least 1x1"
        return None
    except Exception as err:  # noqa: BLE001 - every decoder failure means "cannot be decoded" here
        return "undecodable", f"cannot be decoded ({type(err).__name__}: {err})"


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
            raise DataError(f"cannot decode '{path}': {err} (data.on_invalid=skip with verify_files=true leaves such "
                            f"files out)") from err
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

    MATCH_ON_RESUME = ("class_names",)  # data_info keys a checkpoint must agree on (resume, eval)
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
        on_invalid: str = "error",
        verify_files: bool = True,
        on_corrupt: str | None = None,
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
        check_on_corrupt(on_corrupt)
        self.on_invalid = on_invalid
        self.invalid = InvalidRecords(on_invalid)
        self.verify_files = verify_files
        self.augment = augment or {}
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.splits = None  # split name -> datasets.Dataset(path, label)
        self.class_names: list[str] = []
        self.digests: dict[str, dict[str, str]] = {}  # split -> {path: SHA-256}, taken by the checks
        self.batch_mix = None

    # -- loading ---------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return  # train/eval call setup before Lightning does; load once
        check_data_files(self.root, self.format, self.manifest)
        if self.format == "manifest":
            records = read_manifests(self.root, self.manifest, self.invalid)
        else:
            records = scan_imagefolder(self.root, self.invalid)
        if self.verify_files:  # false: the files are trusted as they are (benchmarks of the input pipeline)
            records = self._check_files(records)
            records = self._check_contents(records)
        for split, rows in records.items():
            if not rows:
                raise DataError(f"split '{split}' of data.root '{self.root}' has no usable files left after "
                                f"data.on_invalid=skip left out {len(self.invalid)} record(s): {self.invalid_records}")
        self.invalid.log(log, self.root)
        self.class_names = check_class_sets(records, self.root)
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

    def _check_files(self, records):
        """Each file decodes, has the configured bands, pixels, and finite values."""
        kept = {}
        for split, rows in records.items():
            kept[split] = []
            for rel, label in rows:
                problem = verify_file(self.root / rel, len(self.channels))
                if problem is None:
                    kept[split].append((rel, label))
                else:
                    reason, why = problem
                    self.invalid(reason, rel, f"'{self.root / rel}' (split '{split}', class '{label}'): {why}")
        return kept

    def _check_contents(self, records):
        """By the files' SHA-256 (hashed once, through the digest cache, and reused by lineage()): the same bytes
        under two labels in a split, and validation/test files identical to training (or validation) files."""
        self.digests = {split: file_digests(self.root, [rel for rel, _ in rows]) for split, rows in records.items()}
        same = SameBytes(self.root)
        drop: dict[str, set[str]] = {split: set() for split in records}
        for split, rows in records.items():
            first: dict[str, tuple[str, str]] = {}  # sha -> (path, label)
            for rel, label in rows:
                sha = self.digests[split][rel]
                if sha not in first:
                    first[sha] = (rel, label)
                elif first[sha][1] != label and same(rel, first[sha][0]):
                    other, other_label = first[sha]
                    self.invalid("conflicting_labels", rel,
                                 f"'{self.root / rel}' (split '{split}', class '{label}') has the same bytes as "
                                 f"'{self.root / other}' (class '{other_label}'); expected one label per image")
                    if other not in drop[split]:  # both copies are left out, so both are counted
                        self.invalid("conflicting_labels", other,
                                     f"'{self.root / other}' (split '{split}', class '{other_label}') has the same "
                                     f"bytes as '{self.root / rel}' (class '{label}'); expected one label per image")
                    drop[split] |= {rel, other}
        for split, rel, earlier, other in shared_across_splits(self.digests, same):
            if rel in drop[split]:
                continue
            self.invalid("shared_across_splits", rel,
                         f"'{self.root / rel}' (split '{split}') has the same bytes (SHA-256 "
                         f"{self.digests[split][rel][:12]}) as '{self.root / other}' in split '{earlier}'; expected "
                         f"each image in one split only (a {split} score on training images measures memory)")
            drop[split].add(rel)  # kept where it came first (train), left out of the later split
        return {split: [r for r in rows if r[0] not in drop[split]] for split, rows in records.items()}

    # -- recipe contract -------------------------------------------------------------------------
    @property
    def invalid_records(self) -> dict[str, dict[str, Any]]:
        """``{reason: {count, first_paths, first_message}}`` of the records data.on_invalid=skip left out."""
        return self.invalid.by_reason

    @property
    def skipped(self) -> list[str]:
        return self.invalid.paths

    @property
    def data_info(self) -> dict[str, Any]:
        # mean/std: the normalisation the export puts inside the model
        return {"class_names": self.class_names, "channels": self.channels, "image_size": self.image_size,
                "mean": self.mean, "std": self.std}

    def has_split(self, name: str) -> bool:
        return self.splits is not None and name in self.splits

    def lineage(self) -> DatasetLineage:
        lineage = DatasetLineage(name="plastic_sorting", root=str(self.root), datacard=read_datacard(self.root),
                                 skipped_files=list(self.skipped), invalid_records=self.invalid_records)
        lineage.datacard.update(self.invalid.lineage_fields())
        for split, ds in self.splits.items():
            digest = digest_files(self.root, ds["path"], ds["label"], digests=self.digests.get(split))
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
