"""Loading crop_detection data: COCO JSON or the HF object-detection layout, checks, box-aware augmentation.

Layouts (``data.format``):

* ``coco`` — per split an annotation file and an image folder (``data.splits.<split>.annotations`` and
  ``.images``), as CVAT, Label Studio and Roboflow export them: ``images``, ``annotations`` with
  ``bbox: [x, y, w, h]`` in pixels, ``categories`` with any (non-contiguous) ids.
* ``hf`` — the Hugging Face object-detection layout: ``<root>/<split>/metadata.jsonl`` next to the images,
  one line per image ``{"file_name": ..., "objects": {"bbox": [[x, y, w, h], ...], "category": [0, ...]}}``,
  read line by line here (each error names its line); class names from ``data.class_names``.

Both become one ``datasets.Dataset`` per split (file, width, height, boxes as xyxy, labels 1..K; 0 is
background in torchvision detectors). Images without boxes are valid negatives.

Data are checked when first read, not trusted: a box of zero or negative size, NaN/inf or not 4 numbers, an
annotation without ``bbox`` or ``id``, duplicate ids, an unreadable or 0-pixel image, an image whose bytes are
also in an earlier split (by the SHA-256 the lineage digest takes anyway). ``data.on_invalid=error`` (default)
stops the run naming the file, record and value; ``skip`` leaves the image out (with all its boxes: a missing box
would teach the model that object as background) and counts it per reason (``invalid_records``, the lineage,
summary.json, MLflow). Duplicate category ids and a file_name resolving outside data.root always stop the run.
Boxes reaching outside the image are clipped, with a count in the log and the lineage.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from aifactory_train.recipe import DataError
from aifactory_train.recipe import DataLoader  # resumes mid-epoch (torchdata)
from aifactory_train.recipe import shuffled
from aifactory_train.recipe import (DatasetLineage, InvalidRecords, SameBytes, SplitLineage, digest_files,
                                     file_digests, inside_root, read_datacard, shared_across_splits)
from aifactory_train.recipe import withdrawn
from .config import REQUIRED_SPLITS, check_data_files

log = logging.getLogger(__name__)


def _image_size(path: Path) -> tuple[tuple[int, int] | None, str | None]:
    """((width, height), None) from the header, or (None, why it cannot be read)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.size, None
    except Exception as err:  # noqa: BLE001 - any decoder failure
        return None, f"{type(err).__name__}: {err}"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def box_problem(bbox: Any, where: str) -> tuple[str, str] | None:
    """(reason, message) when ``bbox`` is not a possible [x, y, width, height] box, else None. Boxes of zero or
    negative size and NaN/inf coordinates used to be dropped or trained on silently; they are annotation errors."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_number(v) for v in bbox):
        return "bad_box", (f"{where}: 'bbox' is {bbox!r}; expected [x, y, width, height], 4 numbers in pixels")
    if not all(math.isfinite(v) for v in bbox):
        return "impossible_box", f"{where}: 'bbox' is {bbox!r}; expected finite numbers (no NaN or inf)"
    if bbox[2] <= 0 or bbox[3] <= 0:
        return "impossible_box", (f"{where}: 'bbox' {bbox!r} has width {bbox[2]} and height {bbox[3]}; expected "
                                  f"both > 0")
    return None


def _clip_boxes(boxes_xywh, width: int, height: int, counts: Counter, names: list[str]) -> tuple[list, tuple | None]:
    """xywh → xyxy inside the image (boxes reaching outside it are clipped and counted); (boxes, problem) where
    problem is (reason, message) for a box with no pixel inside the image."""
    kept = []
    for i, (x, y, w, h) in enumerate(boxes_xywh):
        x0, y0, x1, y1 = x, y, x + w, y + h
        cx0, cy0, cx1, cy1 = max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)
        if cx1 - cx0 < 1 or cy1 - cy0 < 1:
            return kept, ("box_outside_image", f"{names[i]}: 'bbox' {[x, y, w, h]!r} lies outside the "
                                               f"{width}x{height} image; expected a box with pixels inside it")
        if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
            counts["clipped_outside_image"] += 1
        kept.append([cx0, cy0, cx1, cy1])
    return kept, None


def read_text(path: Path, what: str) -> str:
    """The file as UTF-8 text; else a DataError naming the line and byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{what} '{path}' line {line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save it as "
                        f"UTF-8") from None


class _Image:
    """One image of a split being read: its record, or why it was left out."""

    def __init__(self, where: str, file_name: Any):
        self.where, self.file_name = where, file_name
        self.size: tuple | None = None  # (width, height) the annotations give, checked against the file
        self.boxes: list = []
        self.box_names: list[str] = []  # what names each box in an error: its annotation, or "line N box i"
        self.category_ids: list[int] = []
        self.bad = False


def _finish_images(root: Path, base: Path, images: list[_Image], counts: Counter, invalid: InvalidRecords,
                   path_where: str) -> list[dict]:
    """Records of the images not left out: each file inside the root, there once, readable, with pixels, the
    size the annotations say, every box with pixels in it."""
    resolved_root = root.resolve()
    records, seen = [], {}
    for image in images:
        if image.bad:
            continue
        if not isinstance(image.file_name, str) or not image.file_name:
            invalid("missing_field", image.where, f"{image.where}: 'file_name' is {image.file_name!r}; expected "
                                                  f"the image's path relative to '{base}'")
            continue
        full = inside_root(root, image.file_name, f"{image.where} {path_where}", base=base)  # refused, always
        if withdrawn(full):  # a withdrawn subject or record (the card's withdrawal list)
            continue
        rel = full.relative_to(resolved_root).as_posix()
        if not full.is_file():
            invalid("missing_file", rel, f"{image.where}: image '{image.file_name}' does not exist in '{base}'")
            continue
        if rel in seen:
            invalid("duplicate_file", rel, f"{image.where}: image '{image.file_name}' is listed again (first as "
                                           f"{seen[rel]}); expected each image once, with all its boxes")
            continue
        seen[rel] = image.where
        size, why = _image_size(full)
        if size is None:
            invalid("undecodable", rel, f"{image.where}: image '{full}' cannot be read: {why}")
            continue
        width, height = size
        if width < 1 or height < 1:
            invalid("empty_image", rel, f"{image.where}: image '{full}' is {width}x{height} pixels; expected at "
                                        f"least 1x1")
            continue
        if image.size is not None and image.size != (width, height):
            invalid("size_mismatch", rel, f"{image.where}: image '{full}' is {width}x{height} pixels, but the "
                                          f"annotations say {image.size[0]}x{image.size[1]}; fix them (or re-export) "
                                          f"so boxes line up")
            continue
        boxes, problem = _clip_boxes(image.boxes, width, height, counts, image.box_names)
        if problem is not None:
            invalid(problem[0], rel, problem[1])
            continue
        records.append({"file": rel, "width": width, "height": height, "boxes": boxes,
                        "category_ids": image.category_ids})
    return records


def read_coco_split(root: Path, split: str, annotations: str, images: str, counts: Counter,
                    invalid: InvalidRecords | None = None):
    """(records, categories) of one COCO split, after the checks in the module docstring."""
    invalid = invalid if invalid is not None else InvalidRecords()
    path = root / annotations
    image_dir = root / images
    if not path.is_file():
        raise DataError(f"data.splits.{split}.annotations: COCO file '{path}' does not exist")
    try:
        coco = json.loads(read_text(path, "COCO file"))
    except json.JSONDecodeError as err:
        raise DataError(f"COCO file '{path}' is not valid JSON: {err}") from None
    if not isinstance(coco, dict):
        raise DataError(f"COCO file '{path}' holds a {type(coco).__name__}; expected an object with 'images', "
                        f"'annotations' and 'categories'")
    missing = [k for k in ("images", "annotations", "categories") if k not in coco]
    if missing:
        raise DataError(f"COCO file '{path}' lacks the key(s) {missing}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco[key], list):
            raise DataError(f"COCO file '{path}': '{key}' is a {type(coco[key]).__name__}; expected a list")
    if not coco["annotations"]:
        raise DataError(f"COCO file '{path}' (split '{split}') has an empty annotation list: nothing to learn or score")
    # categories define the labels: a bad one is never skipped, it would change what every other label means
    categories: dict[int, str] = {}
    for i, cat in enumerate(coco["categories"]):
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or isinstance(cat.get("id"), bool) \
                or not isinstance(cat.get("name"), str):
            raise DataError(f"COCO file '{path}': categories[{i}] is {cat!r}; expected {{\"id\": <integer>, "
                            f"\"name\": <text>}}")
        if cat["id"] in categories:
            raise DataError(f"COCO file '{path}': categories[{i}] has id {cat['id']} ('{cat['name']}'), already "
                            f"the id of '{categories[cat['id']]}'; expected one id per category")
        categories[cat["id"]] = cat["name"]
    by_id: dict[int, _Image] = {}
    order: list[_Image] = []
    for i, img in enumerate(coco["images"]):
        where = f"COCO file '{path}' images[{i}]"
        image_id = img.get("id") if isinstance(img, dict) else None
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            invalid("missing_id", f"{path}:images[{i}]", f"{where}: 'id' is {image_id!r}; expected an integer "
                                                         f"image id")
            continue
        image = _Image(f"COCO file '{path}' image {image_id}", img.get("file_name"))
        image.size = (img.get("width"), img.get("height"))
        if image_id in by_id:
            # which annotations belong to which of the two cannot be told: both go (or the run stops)
            invalid("duplicate_id", f"{path}:images[{i}]", f"{where}: image id {image_id} is already used by "
                                                           f"another image; expected unique image ids")
            if not by_id[image_id].bad:
                by_id[image_id].bad = True
                invalid("duplicate_id", f"{path}:image {image_id}", f"{where}: image id {image_id} is used twice")
            continue
        by_id[image_id] = image
        order.append(image)
    annotation_ids: dict[int, int] = {}
    for j, ann in enumerate(coco["annotations"]):
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        where = f"COCO file '{path}' annotation {ann_id} (annotations[{j}])"
        if not isinstance(ann, dict):
            invalid("bad_annotation", f"{path}:annotations[{j}]", f"{where}: a {type(ann).__name__}; expected an "
                                                                  f"object with id, image_id, category_id, bbox")
            continue
        image = by_id.get(ann.get("image_id"))
        if image is None:
            invalid("unknown_image", f"{path}:annotations[{j}]",
                    f"{where} refers to image_id {ann.get('image_id')!r}, which is not in 'images'")
            continue
        if image.bad:
            continue  # (already left out with its first problem)
        problem = None
        if not isinstance(ann_id, int) or isinstance(ann_id, bool):
            problem = "missing_id", f"{where}: 'id' is {ann_id!r}; expected an integer annotation id"
        elif ann_id in annotation_ids:
            problem = "duplicate_id", (f"{where}: id {ann_id} is also the id of annotations[{annotation_ids[ann_id]}]"
                                       f"; expected unique annotation ids (an annotation exported twice?)")
        elif ann.get("category_id") not in categories:
            problem = "unknown_category", (f"{where} has category_id {ann.get('category_id')!r}, not in 'categories' "
                                           f"(valid ids: {sorted(categories)})")
        elif "bbox" not in ann:
            problem = "missing_field", f"{where} has no 'bbox'; expected [x, y, width, height] in pixels"
        else:
            problem = box_problem(ann["bbox"], where)
        if isinstance(ann_id, int):
            annotation_ids.setdefault(ann_id, j)
        if problem is not None:
            # an image keeps all its boxes or goes: with one box missing, the model would learn that object as
            # background
            image.bad = True
            invalid(problem[0], image.file_name if isinstance(image.file_name, str) else image.where, problem[1])
            continue
        image.boxes.append([float(v) for v in ann["bbox"]])
        image.box_names.append(f"{where} of image {ann['image_id']} '{image.file_name}'")
        image.category_ids.append(ann["category_id"])
    return _finish_images(root, image_dir, order, counts, invalid, "file_name"), categories


def read_hf_split(root: Path, split: str, class_names: list[str], counts: Counter,
                  invalid: InvalidRecords | None = None):
    """Records of ``<root>/<split>/metadata.jsonl`` (the HF object-detection layout). Read here line by line, not
    with HF's imagefolder builder, so that every error names its line and every file_name is checked to lie
    inside the root."""
    invalid = invalid if invalid is not None else InvalidRecords()
    folder = root / split
    metadata = folder / "metadata.jsonl"
    if not metadata.is_file():
        raise DataError(f"data.format=hf: '{metadata}' does not exist (one line per image with "
                        f"file_name and objects: {{bbox, category}})")
    images, total = [], 0
    for line, raw in enumerate(metadata.read_bytes().split(b"\n"), start=1):
        where = f"'{metadata}' line {line}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            invalid("not_utf8", f"{metadata}:{line}", f"{where}: not UTF-8 text (byte 0x{raw[err.start]:02x} at "
                                                      f"column {err.start + 1}); save the file as UTF-8")
            continue
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as err:
            invalid("bad_json", f"{metadata}:{line}", f"{where}: not valid JSON ({err.msg} at column {err.colno}); "
                                                      f"each line must be one object with file_name and objects")
            continue
        objects = row.get("objects") if isinstance(row, dict) else None
        image = _Image(where, row.get("file_name") if isinstance(row, dict) else None)
        image.size = None
        images.append(image)
        record_path = image.file_name if isinstance(image.file_name, str) else f"{metadata}:{line}"
        if not isinstance(objects, dict) or not isinstance(objects.get("bbox"), list):
            image.bad = True
            invalid("missing_field", record_path, f"{where}: 'objects' is {objects!r}; expected {{\"bbox\": "
                                                  f"[[x, y, w, h], ...], \"category\": [index, ...]}}")
            continue
        categories = objects.get("category", objects.get("categories", []))
        problem = None
        if not isinstance(categories, list) or len(categories) != len(objects["bbox"]):
            problem = "missing_field", (f"{where}: objects has {len(objects['bbox'])} bbox(es) and category "
                                        f"{categories!r}; expected one category index per box")
        else:
            for c in categories:
                if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < len(class_names):
                    problem = "unknown_category", (f"{where}: category {c!r} is not an index into data.class_names "
                                                   f"{class_names} (valid: 0..{len(class_names) - 1})")
                    break
            for i, bbox in enumerate(objects["bbox"]):
                problem = problem or box_problem(bbox, f"{where} box {i}")
        if problem is not None:
            image.bad = True
            invalid(problem[0], record_path, problem[1])
            continue
        image.boxes = [[float(v) for v in b] for b in objects["bbox"]]
        image.box_names = [f"{where} box {i}" for i in range(len(image.boxes))]
        image.category_ids = list(categories)
        total += len(categories)
    records = _finish_images(root, folder, images, counts, invalid, "file_name")
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

    MATCH_ON_RESUME = ("class_names",)  # data_info keys a checkpoint must agree on (resume, eval)
    def __init__(self, root: str, format: str = "coco", splits: dict[str, dict[str, str]] | None = None,
                 class_names: list[str] | None = None, batch_size: int = 4, num_workers: int = 2,
                 augment: dict[str, Any] | None = None, on_invalid: str = "error"):
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
        self.on_invalid = on_invalid
        self.invalid = InvalidRecords(on_invalid)
        self.digests: dict[str, dict[str, str]] = {}  # split -> {file: SHA-256}, taken by the checks

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
                records, cats = read_coco_split(self.root, split, files["annotations"], files["images"],
                                                self.box_counts, self.invalid)
            else:
                if split == "test" and not (self.root / split).is_dir():
                    continue
                records, cats = read_hf_split(self.root, split, self.configured_class_names, self.box_counts,
                                              self.invalid)
            if categories is None:
                categories = cats
            elif cats != categories:
                raise DataError(f"data.root '{self.root}': split '{split}' has other categories than 'train' "
                                f"({cats} vs {categories}); every split needs the same class set")
            per_split[split] = records
        per_split = self._check_contents(per_split)
        for split, records in per_split.items():
            if not records:
                raise DataError(f"split '{split}' of data.root '{self.root}' has no usable images left after "
                                f"data.on_invalid=skip left out {len(self.invalid)} record(s): {self.invalid_records}")
        self.invalid.log(log, self.root)
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

    def _check_contents(self, per_split):
        """Validation/test images whose bytes (SHA-256, hashed once through the digest cache and reused by
        lineage()) are also in an earlier split are left out there, or stop the run."""
        self.digests = {split: file_digests(self.root, [r["file"] for r in records])
                        for split, records in per_split.items()}
        drop: dict[str, set[str]] = {split: set() for split in per_split}
        for split, rel, earlier, other in shared_across_splits(self.digests, SameBytes(self.root)):
            self.invalid("shared_across_splits", rel,
                         f"image '{self.root / rel}' (split '{split}') has the same bytes (SHA-256 "
                         f"{self.digests[split][rel][:12]}) as '{self.root / other}' in split '{earlier}'; expected "
                         f"each image in one split only (a {split} score on training images measures memory)")
            drop[split].add(rel)
        return {split: [r for r in records if r["file"] not in drop[split]] for split, records in per_split.items()}

    # -- recipe contract -------------------------------------------------------------------------
    @property
    def invalid_records(self) -> dict[str, dict[str, Any]]:
        """``{reason: {count, first_paths, first_message}}`` of the images data.on_invalid=skip left out."""
        return self.invalid.by_reason

    @property
    def data_info(self) -> dict[str, Any]:
        return {"class_names": self.class_names, "category_ids": self.category_ids}

    def has_split(self, name: str) -> bool:
        return self.splits is not None and name in self.splits

    def lineage(self) -> DatasetLineage:
        lineage = DatasetLineage(name="crop_detection", root=str(self.root), datacard=read_datacard(self.root),
                                 skipped_files=list(self.invalid.paths), invalid_records=self.invalid_records)
        for split, ds in self.splits.items():
            # the digest covers every image's bytes and its boxes+labels (the annotation content)
            labels = [json.dumps([b, c]) for b, c in zip(ds["boxes"], ds["category_ids"])]
            digest = digest_files(self.root, ds["file"], labels, digests=self.digests.get(split))
            lineage.splits[split] = SplitLineage(name=split, num_rows=len(ds), digest=digest, dataset=ds)
        lineage.datacard = {**lineage.datacard, **{f"boxes_{k}": str(v) for k, v in self.box_counts.items()},
                            **self.invalid.lineage_fields()}
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
