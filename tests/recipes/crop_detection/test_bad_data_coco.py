"""crop_detection: every bad COCO / HF-metadata input is one clear error naming the culprit, or (data.on_invalid=skip)
a counted skip of its image.

Each case writes a crafted real annotation file (or image) into a private copy of the synthetic data and calls the
DataModule's setup, as `aift train` and `aift data check` do; one case runs the CLI end to end.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from aifactory_train.errors import DataError
from aifactory_train.recipes.crop_detection.data import CropDetectionDataModule
from conftest import aift, assert_one_line_naming, write_hf_detection_layout

SPLITS = {s: {"annotations": f"annotations/{s}.json", "images": f"images/{s}"} for s in ("train", "val", "test")}


def datamodule(root: Path, **kwargs) -> CropDetectionDataModule:
    return CropDetectionDataModule(root=str(root), splits=SPLITS, batch_size=4, num_workers=0, **kwargs)


def coco(root: Path, split: str = "train") -> dict:
    return json.loads((root / "annotations" / f"{split}.json").read_text())


def save(root: Path, data: dict, split: str = "train") -> None:
    (root / "annotations" / f"{split}.json").write_text(json.dumps(data))


def annotate(root: Path, change) -> str:
    """Apply ``change`` to the first annotation of train.json; the annotation's "id (annotations[0])" name."""
    data = coco(root)
    change(data["annotations"][0])
    save(root, data)
    return f"annotation {data['annotations'][0].get('id')} (annotations[0])"


# -- each damage returns the pieces the one-line error must name ---------------------------------------------
def bbox_missing(root):
    return [annotate(root, lambda a: a.pop("bbox")), "train.json", "no 'bbox'", "[x, y, width, height]"]


def bbox_of_three_numbers(root):
    return [annotate(root, lambda a: a.update(bbox=[1, 2, 3])), "'bbox' is [1, 2, 3]", "4 numbers"]


def bbox_of_strings(root):
    return [annotate(root, lambda a: a.update(bbox=["1", "2", "30", "40"])), "'bbox' is ['1', '2', '30', '40']",
            "4 numbers"]


def bbox_of_zero_width(root):
    return [annotate(root, lambda a: a["bbox"].__setitem__(2, 0)), "has width 0", "expected both > 0"]


def bbox_of_negative_height(root):
    return [annotate(root, lambda a: a["bbox"].__setitem__(3, -4.0)), "height -4.0", "expected both > 0"]


def bbox_with_nan(root):
    where = annotate(root, lambda a: a["bbox"].__setitem__(0, float("nan")))  # json writes NaN, as some tools do
    assert "NaN" in (root / "annotations" / "train.json").read_text()
    return [where, "nan", "finite numbers"]


def bbox_with_inf(root):
    return [annotate(root, lambda a: a["bbox"].__setitem__(3, float("inf"))), "inf", "finite numbers"]


def box_outside_the_image(root):
    return [annotate(root, lambda a: a.update(bbox=[400.0, 400.0, 20.0, 20.0])), "lies outside the 256x256 image"]


def annotation_without_id(root):
    return [annotate(root, lambda a: a.pop("id")), "annotation None (annotations[0])", "'id' is None"]


def duplicate_annotation_id(root):
    data = coco(root)
    data["annotations"][1]["id"] = data["annotations"][0]["id"]
    save(root, data)
    return ["annotations[1]", f"id {data['annotations'][0]['id']} is also the id of annotations[0]"]


def image_without_id(root):
    data = coco(root)
    data["images"][0].pop("id")
    save(root, data)
    return ["train.json", "images[0]", "'id' is None", "integer image id"]


def duplicate_image_id(root):
    data = coco(root)
    data["images"][1]["id"] = data["images"][0]["id"]
    save(root, data)
    return ["train.json", "images[1]", f"image id {data['images'][0]['id']} is already used"]


def duplicate_category_id(root):
    data = coco(root)
    data["categories"].append({"id": data["categories"][0]["id"], "name": "stone"})
    save(root, data)
    return ["train.json", f"has id {data['categories'][0]['id']} ('stone')", f"'{data['categories'][0]['name']}'"]


def image_listed_twice(root):
    data = coco(root)
    data["images"][1]["file_name"] = data["images"][0]["file_name"]
    save(root, data)
    return ["train.json", f"'{data['images'][0]['file_name']}' is listed again", "expected each image once"]


def file_name_with_dotdot(root):
    outside = root.parent / "other_owner"
    outside.mkdir()
    data = coco(root)
    shutil.copy(root / "images" / "train" / data["images"][0]["file_name"], outside / "img.jpg")
    data["images"][0]["file_name"] = "../../../other_owner/img.jpg"
    save(root, data)
    return ["train.json", f"image {data['images'][0]['id']} file_name", "'../../../other_owner/img.jpg'",
            "outside data.root"]


def absolute_file_name(root):
    outside = root.parent / "elsewhere"
    outside.mkdir()
    data = coco(root)
    shutil.copy(root / "images" / "train" / data["images"][0]["file_name"], outside / "img.jpg")
    data["images"][0]["file_name"] = str(outside / "img.jpg")
    save(root, data)
    return ["train.json", str(outside / "img.jpg"), "outside data.root"]


def file_name_symlink_out_of_root(root):
    outside = root.parent / "secret"
    outside.mkdir()
    data = coco(root)
    name = data["images"][0]["file_name"]
    shutil.move(root / "images" / "train" / name, outside / name)
    (root / "images" / "train" / name).symlink_to(outside / name)
    return ["train.json", f"'{name}' resolves to '{outside / name}'", "outside data.root"]


def image_that_does_not_decode(root):
    name = coco(root)["images"][0]["file_name"]
    (root / "images" / "train" / name).write_bytes(b"\xff\xd8 not a jpeg")
    return ["train.json", name, "cannot be read"]


def val_image_identical_to_a_train_image(root):
    train_name = coco(root)["images"][0]["file_name"]
    val_name = coco(root, "val")["images"][0]["file_name"]
    shutil.copy(root / "images" / "train" / train_name, root / "images" / "val" / val_name)
    return [val_name, "split 'val'", "same bytes", train_name, "split 'train'"]


def coco_file_not_json(root):
    (root / "annotations" / "train.json").write_text('{"images": [], "annotations": [,]}')
    return ["train.json", "is not valid JSON", "line 1"]


def coco_file_not_utf8(root):
    text = json.dumps(coco(root), indent=1).replace('"crop"', '"caf\u00e9"', 1)
    (root / "annotations" / "train.json").write_bytes(text.encode("latin-1"))
    line = text[: text.index("caf")].count("\n") + 1
    return ["train.json", f"line {line}", "not UTF-8", "0xe9"]


CASES = [bbox_missing, bbox_of_three_numbers, bbox_of_strings, bbox_of_zero_width, bbox_of_negative_height,
         bbox_with_nan, bbox_with_inf, box_outside_the_image, annotation_without_id, duplicate_annotation_id,
         image_without_id, duplicate_image_id, duplicate_category_id, image_listed_twice, file_name_with_dotdot,
         absolute_file_name, file_name_symlink_out_of_root, image_that_does_not_decode,
         val_image_identical_to_a_train_image, coco_file_not_json, coco_file_not_utf8]


@pytest.mark.parametrize("damage", CASES, ids=lambda f: f.__name__)
def test_bad_coco_input_is_one_line_naming_the_culprit(damage, crop_copy):
    expected = damage(crop_copy)
    with pytest.raises(DataError) as err:
        datamodule(crop_copy).setup("fit")
    assert_one_line_naming(str(err.value), expected)


# -- the HF layout's metadata.jsonl ---------------------------------------------------------------------------
@pytest.fixture
def hf_root(crop_data, tmp_path) -> Path:
    return write_hf_detection_layout(crop_data, tmp_path / "hf")


def hf_datamodule(root: Path, **kwargs) -> CropDetectionDataModule:
    return CropDetectionDataModule(root=str(root), format="hf", class_names=["crop", "weed"], num_workers=0, **kwargs)


def _rewrite_line(root: Path, index: int, text: bytes) -> Path:
    path = root / "train" / "metadata.jsonl"
    lines = path.read_bytes().splitlines()
    lines[index] = text
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def hf_line_not_json(root):
    _rewrite_line(root, 2, b'{"file_name": "x.jpg", objects: {}}')
    return ["metadata.jsonl' line 3", "not valid JSON"]


def hf_line_not_utf8(root):
    _rewrite_line(root, 1, '{"file_name": "caf\u00e9.jpg", "objects": {"bbox": [], "category": []}}'.encode("latin-1"))
    return ["metadata.jsonl' line 2", "not UTF-8", "0xe9"]


def hf_file_name_with_dotdot(root):
    (root.parent / "theirs").mkdir()
    name = json.loads((root / "train" / "metadata.jsonl").read_text().splitlines()[0])["file_name"]
    shutil.copy(root / "train" / name, root.parent / "theirs" / name)
    _rewrite_line(root, 0, json.dumps({"file_name": f"../../theirs/{name}",
                                        "objects": {"bbox": [[1, 1, 9, 9]], "category": [0]}}).encode())
    return ["metadata.jsonl' line 1", f"'../../theirs/{name}'", "outside data.root"]


def hf_box_with_nan(root):
    name = json.loads((root / "train" / "metadata.jsonl").read_text().splitlines()[0])["file_name"]
    _rewrite_line(root, 0, json.dumps({"file_name": name, "objects": {"bbox": [[1, float("nan"), 9, 9]],
                                                                      "category": [0]}}).encode())
    return ["metadata.jsonl' line 1 box 0", "nan", "finite numbers"]


def hf_fewer_categories_than_boxes(root):
    name = json.loads((root / "train" / "metadata.jsonl").read_text().splitlines()[0])["file_name"]
    _rewrite_line(root, 0, json.dumps({"file_name": name, "objects": {"bbox": [[1, 1, 9, 9], [2, 2, 5, 5]],
                                                                      "category": [0]}}).encode())
    return ["metadata.jsonl' line 1", "2 bbox(es)", "one category index per box"]


HF_CASES = [hf_line_not_json, hf_line_not_utf8, hf_file_name_with_dotdot, hf_box_with_nan,
            hf_fewer_categories_than_boxes]


@pytest.mark.parametrize("damage", HF_CASES, ids=lambda f: f.__name__)
def test_bad_hf_metadata_is_one_line_naming_file_and_line(damage, hf_root):
    expected = damage(hf_root)
    with pytest.raises(DataError) as err:
        hf_datamodule(hf_root).setup("fit")
    assert_one_line_naming(str(err.value), expected)


# -- skip -----------------------------------------------------------------------------------------------------
def test_skip_leaves_each_bad_image_out_with_all_its_boxes_and_counts_it(crop_copy, caplog):
    data = coco(crop_copy)
    annotated = []  # the first annotation of distinct images
    for ann in data["annotations"]:
        if ann["image_id"] not in [a["image_id"] for a in annotated]:
            annotated.append(ann)
    annotated[0]["bbox"][2] = 0                        # impossible_box
    annotated[1]["bbox"] = [1, 2, 3]                   # bad_box
    annotated[2].pop("bbox")                           # missing_field
    bad = {a["image_id"] for a in annotated[:3]}
    save(crop_copy, data)
    kept = next(img["file_name"] for img in data["images"] if img["id"] not in bad)
    shutil.copy(crop_copy / "images" / "train" / kept,  # shared_across_splits
                crop_copy / "images" / "val" / coco(crop_copy, "val")["images"][0]["file_name"])
    dm = datamodule(crop_copy, on_invalid="skip")
    dm.setup("fit")
    counts = {reason: entry["count"] for reason, entry in dm.invalid_records.items()}
    assert counts == {"impossible_box": 1, "bad_box": 1, "missing_field": 1, "shared_across_splits": 1}
    assert len(dm.splits["train"]) == len(data["images"]) - len(bad)
    names = {img["id"]: img["file_name"] for img in data["images"]}
    assert not {f"images/train/{names[i]}" for i in bad} & set(dm.splits["train"]["file"])
    assert len(dm.splits["val"]) == len(coco(crop_copy, "val")["images"]) - 1
    dataset = dm.lineage().as_dict()
    assert dataset["skipped_files"] == 4 and dataset["invalid_records"]["bad_box"]["count"] == 1
    assert dataset["datacard"]["skipped_impossible_box"] == "1"
    assert "data.on_invalid=skip: left out 1 record(s)" in caplog.text


def test_a_file_name_outside_the_root_is_refused_even_with_skip(crop_copy):
    file_name_with_dotdot(crop_copy)
    with pytest.raises(DataError, match="outside data.root"):
        datamodule(crop_copy, on_invalid="skip").setup("fit")


def test_cli_refuses_a_nan_box_and_writes_nothing(crop_copy, tmp_path):
    from conftest import runs_in

    expected = bbox_with_nan(crop_copy)
    work = tmp_path / "work"
    work.mkdir()
    result = aift("train", "recipe=crop_detection", f"data.root={crop_copy}", "debug=smoke", "hydra.run.dir=out",
                  cwd=work)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    assert all(piece in result.stderr for piece in expected), result.stderr[-2000:]
    assert not runs_in(work / "mlflow.db")
    written = [p.relative_to(work / "out").as_posix() for p in (work / "out").rglob("*") if p.is_file()]
    assert [p for p in written if not p.startswith(".hydra/") and not p.endswith(".log")] == [], written
