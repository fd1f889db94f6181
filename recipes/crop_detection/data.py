"""Loading crop_detection data: COCO JSON or the HF object-detection layout, checks, box-aware augmentation.

Layouts (``data.format``):

* ``coco`` — per split an annotation file and an image folder (``data.splits.<split>.annotations`` and
  ``.images``), as CVAT, Label Studio and Roboflow export them: ``images``, ``annotations`` with
  ``bbox: [x, y, w, h]`` in pixels, ``categories`` with any (non-contiguous) ids.
* ``hf`` — the Hugging Face object-detection layout: ``<root>/<split>/metadata.jsonl`` next to the images,
  one line per image ``{"file_name": ..., "objects": {"bbox": [[x, y, w, h], ...], "category": [0, ...]}}``,
  read with ``datasets.load_dataset("imagefolder")``; class names from ``data.class_names``.

Both become one ``datasets.Dataset`` per split (file, width, height, boxes as xyxy, labels 1..K; 0 is
background in torchvision detectors). Images without boxes are valid negatives. Boxes with no area are
dropped and boxes reaching outside the image are clipped, each with a count in the log and the lineage.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from aifactory_train.errors import DataError
from aifactory_train.resume import ResumableDataLoader as DataLoader  # resumes mid-epoch (torchdata)
from aifactory_train.resume import shuffled
from aifactory_train.lineage import DatasetLineage, SplitLineage, digest_files, read_datacard
from aifactory_train.recipes.crop_detection.config import REQUIRED_SPLITS, check_data_files

log = logging.getLogger(__name__)


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size  # (width, height), header only
    except Exception as err:  # noqa: BLE001 - any decoder failure
        raise DataError(f"image '{path}' cannot be read: {type(err).__name__}: {err}") from None


def _clean_boxes(boxes_xywh, width: int, height: int, counts: Counter) -> tuple[list[list[float]], list[int]]:
    """xywh → xyxy inside the image; indices of the boxes kept."""
    kept, index = [], []
    for i, (x, y, w, h) in enumerate(boxes_xywh):
        if w <= 0 or h <= 0:
            counts["dropped_no_area"] += 1
            continue
        x0, y0, x1, y1 = x, y, x + w, y + h
        cx0, cy0, cx1, cy1 = max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)
        if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
            counts["clipped_outside_image"] += 1
        if cx1 - cx0 < 1 or cy1 - cy0 < 1:
            counts["dropped_outside_image"] += 1
            continue
        kept.append([cx0, cy0, cx1, cy1])
        index.append(i)
    return kept, index


def read_coco_split(root: Path, split: str, annotations: str, images: str, counts: Counter):
    """(records, categories) of one COCO split, after the checks in the module docstring."""
    path = root / annotations
    image_dir = root / images
    if not path.is_file():
        raise DataError(f"data.splits.{split}.annotations: COCO file '{path}' does not exist")
    try:
        coco = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"COCO file '{path}' is not valid JSON: {err}") from None
    missing = [k for k in ("images", "annotations", "categories") if k not in coco]
    if missing:
        raise DataError(f"COCO file '{path}' lacks the key(s) {missing}")
    if not coco["annotations"]:
        raise DataError(f"COCO file '{path}' (split '{split}') has an empty annotation list: nothing to learn or score")
    categories = {c["id"]: c["name"] for c in coco["categories"]}
    by_image: dict[int, list[dict]] = {img["id"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        if ann["image_id"] not in by_image:
            raise DataError(f"COCO file '{path}': annotation {ann.get('id')} refers to image_id {ann['image_id']}, "
                            f"which is not in 'images'")
        if ann["category_id"] not in categories:
            raise DataError(f"COCO file '{path}': annotation {ann.get('id')} has category_id {ann['category_id']}, "
                            f"not in 'categories' (valid ids: {sorted(categories)})")
        by_image[ann["image_id"]].append(ann)
    records = []
    for img in coco["images"]:
        file = image_dir / img["file_name"]
        if not file.is_file():
            raise DataError(f"COCO file '{path}': image {img['id']} '{img['file_name']}' does not exist in '{image_dir}'")
        width, height = _image_size(file)
        if (img.get("width"), img.get("height")) != (width, height):
            raise DataError(f"COCO file '{path}': image '{file}' is {width}x{height} pixels, but the JSON says "
                            f"{img.get('width')}x{img.get('height')}; fix the JSON (or re-export it) so boxes line up")
        anns = by_image[img["id"]]
        boxes, kept = _clean_boxes([a["bbox"] for a in anns], width, height, counts)
        records.append({"file": file.relative_to(root).as_posix(), "width": width, "height": height,
                        "boxes": boxes, "category_ids": [anns[i]["category_id"] for i in kept]})
    return records, categories


def read_hf_split(root: Path, split: str, class_names: list[str], counts: Counter):
    import datasets

    folder = root / split
    if not (folder / "metadata.jsonl").is_file():
        raise DataError(f"data.format=hf: '{folder / 'metadata.jsonl'}' does not exist (one line per image with "
                        f"file_name and objects: {{bbox, category}})")
    # data_files, not data_dir: with data_dir pointing at a folder named like a split, the builder skips
    # its metadata.jsonl (datasets 5.2)
    table = datasets.load_dataset("imagefolder", data_files={split: str(folder / "*")}, split=split)
    if "objects" not in table.column_names:
        raise DataError(f"'{folder / 'metadata.jsonl'}' has no 'objects' column; it has {table.column_names}")
    table = table.cast_column("image", datasets.Image(decode=False))
    records, total = [], 0
    for line, (image, objects) in enumerate(zip(table["image"], table["objects"]), start=1):
        file = Path(image["path"])
        width, height = _image_size(file)
        categories = objects.get("category", objects.get("categories", []))
        for c in categories:
            if not 0 <= c < len(class_names):
                raise DataError(f"'{folder / 'metadata.jsonl'}' line {line}: category {c} is not an index into "
                                f"data.class_names {class_names} (valid: 0..{len(class_names) - 1})")
        total += len(categories)
        boxes, kept = _clean_boxes(objects["bbox"], width, height, counts)
        records.append({"file": file.relative_to(root.resolve()).as_posix() if file.is_absolute() else str(file),
                        "width": width, "height": height, "boxes": boxes,
                        "category_ids": [categories[i] for i in kept]})
    if total == 0:
        raise DataError(f"split '{split}' in '{folder}' has no objects at all: nothing to learn or score")
    return records, dict(enumerate(class_names))


class DetectionFiles(Dataset):
    """Decodes one image and its boxes; augments both together with transforms v2 (in workers)."""

    def __init__(self, root: Path, records, label_of: dict[int, int], transform):
        self.root = root
        self.records = records
        self.label_of = label_of
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        from torchvision.io import ImageReadMode, decode_image

        record = self.records[index]
        path = str(self.root / record["file"])
        try:
            image = tv_tensors.Image(decode_image(path, mode=ImageReadMode.RGB))
        except Exception as err:  # noqa: BLE001 - name the file
            raise DataError(f"cannot decode '{path}': {err}") from err
        boxes = tv_tensors.BoundingBoxes(torch.tensor(record["boxes"], dtype=torch.float32).reshape(-1, 4),
                                         format="XYXY", canvas_size=image.shape[-2:])
        labels = torch.tensor([self.label_of[c] for c in record["category_ids"]], dtype=torch.int64)
        image, target = self.transform(image, {"boxes": boxes, "labels": labels})
        return image, {"boxes": target["boxes"].as_subclass(torch.Tensor), "labels": target["labels"]}


def collate_detection(batch):
    images, targets = zip(*batch)
    return list(images), list(targets)


class CropDetectionDataModule(L.LightningDataModule):
    def __init__(self, root: str, format: str = "coco", splits: dict[str, dict[str, str]] | None = None,
                 class_names: list[str] | None = None, batch_size: int = 4, num_workers: int = 2,
                 augment: dict[str, Any] | None = None):
        super().__init__()
        self.root = Path(root)
        self.format = format
        self.split_files = splits or {}
        self.configured_class_names = list(class_names or [])
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augment = augment or {}
        self.splits = None  # split -> datasets.Dataset
        self.class_names: list[str] = []
        self.category_ids: list[int] = []
        self.box_counts: Counter = Counter()

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        check_data_files(self.root, self.format, self.split_files)
        per_split, categories = {}, None
        names = ("train", "val", "test")
        for split in names:
            if self.format == "coco":
                files = self.split_files.get(split)
                if files is None or (split == "test" and not (self.root / files["annotations"]).is_file()):
                    if split in REQUIRED_SPLITS:
                        raise DataError(f"data.splits.{split}: no annotation file configured for a required split")
                    continue
                records, cats = read_coco_split(self.root, split, files["annotations"], files["images"], self.box_counts)
            else:
                if split == "test" and not (self.root / split).is_dir():
                    continue
                records, cats = read_hf_split(self.root, split, self.configured_class_names, self.box_counts)
            if categories is None:
                categories = cats
            elif cats != categories:
                raise DataError(f"data.root '{self.root}': split '{split}' has other categories than 'train' "
                                f"({cats} vs {categories}); every split needs the same class set")
            per_split[split] = records
        import datasets

        self.category_ids = sorted(categories)
        self.class_names = [categories[i] for i in self.category_ids]
        features = datasets.Features({
            "file": datasets.Value("string"), "width": datasets.Value("int32"), "height": datasets.Value("int32"),
            "boxes": datasets.Sequence(datasets.Sequence(datasets.Value("float32"), length=4)),
            "category_ids": datasets.Sequence(datasets.Value("int64")),
        })
        self.splits = {s: datasets.Dataset.from_list(r, features=features, split=s) for s, r in per_split.items()}
        for reason, count in sorted(self.box_counts.items()):
            log.warning("data %s: %d box(es) %s", self.root, count, reason.replace("_", " "))
        log.info("data %s: classes %s; %s", self.root, self.class_names,
                 ", ".join(f"{s}={len(d)} images" for s, d in self.splits.items()))

    # -- recipe contract -------------------------------------------------------------------------
    @property
    def data_info(self) -> dict[str, Any]:
        return {"class_names": self.class_names, "category_ids": self.category_ids}

    def has_split(self, name: str) -> bool:
        return self.splits is not None and name in self.splits

    def lineage(self) -> DatasetLineage:
        lineage = DatasetLineage(name="crop_detection", root=str(self.root), datacard=read_datacard(self.root))
        for split, ds in self.splits.items():
            # the digest covers every image's bytes and its boxes+labels (the annotation content)
            labels = [json.dumps([b, c]) for b, c in zip(ds["boxes"], ds["category_ids"])]
            digest = digest_files(self.root, ds["file"], labels)
            lineage.splits[split] = SplitLineage(name=split, num_rows=len(ds), digest=digest, dataset=ds)
        lineage.datacard = {**lineage.datacard, **{f"boxes_{k}": str(v) for k, v in self.box_counts.items()}}
        return lineage

    # -- transforms and loaders ------------------------------------------------------------------
    def transform(self, train: bool):
        steps: list = []
        if train:
            if self.augment.get("photometric", True):
                steps.append(v2.RandomPhotometricDistort(p=0.5))
            scale = self.augment.get("scale_jitter")
            if scale:
                steps.append(v2.RandomAffine(degrees=0, scale=tuple(scale)))
            if self.augment.get("hflip", True):
                steps.append(v2.RandomHorizontalFlip())
            if self.augment.get("vflip", True):
                steps.append(v2.RandomVerticalFlip())
            steps.append(v2.SanitizeBoundingBoxes(min_size=1.0))  # boxes pushed out of the image go
        return v2.Compose(steps) if steps else v2.Identity()

    def dataset(self, split: str, train: bool) -> DetectionFiles:
        label_of = {c: i + 1 for i, c in enumerate(self.category_ids)}  # 0 is background
        return DetectionFiles(self.root, list(self.splits[split]), label_of, self.transform(train))

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, targets = batch  # uint8 through the workers; float on the device (4x fewer bytes to move)
        return [v2.functional.to_dtype(i, torch.float32, scale=True) for i in images], targets

    def _loader(self, split: str, train: bool) -> DataLoader:
        dataset = self.dataset(split, train)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=shuffled(dataset, self.trainer) if train else None,
                          drop_last=train and len(self.splits[split]) > self.batch_size,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available(), collate_fn=collate_detection)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        if not self.has_split("test"):
            raise DataError(f"data.root '{self.root}' has no test split")
        return self._loader("test", False)
