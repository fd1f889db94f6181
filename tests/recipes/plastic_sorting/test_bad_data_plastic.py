"""plastic_sorting: every bad input is one clear error naming the culprit, or (data.on_invalid=skip) a counted skip.

Each case damages a private copy of the synthetic data with a crafted real file and calls the DataModule's setup,
as `aift train` and `aift data check` do; one case runs the CLI end to end.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from aifactory_train.errors import DataError
from aifactory_train.recipes.plastic_sorting.data import PlasticSortingDataModule
from conftest import aift, assert_one_line_naming

MANIFEST = {"train": "train.csv", "val": "val.csv"}


def datamodule(root: Path, **kwargs) -> PlasticSortingDataModule:
    return PlasticSortingDataModule(root=str(root), image_size=32, batch_size=8, num_workers=0, **kwargs)


def first(root: Path, split: str = "train", cls: str = "PET", pattern: str = "*.png") -> Path:
    return sorted((root / split / cls).glob(pattern))[0]


def write_manifests(root: Path, extra_train_rows: str = "", kind: str = "csv") -> dict[str, str]:
    for split in ("train", "val"):
        files = sorted((root / split).glob("*/*.png"))
        rows = [(p.relative_to(root).as_posix(), p.parent.name) for p in files]
        if kind == "csv":
            text = "path,label\n" + "".join(f"{p},{label}\n" for p, label in rows)
        else:
            text = "".join(json.dumps({"path": p, "label": label}) + "\n" for p, label in rows)
        (root / f"{split}.{kind}").write_text(text + (extra_train_rows if split == "train" else ""))
    return {"train": f"train.{kind}", "val": f"val.{kind}"}


# -- each damage returns (DataModule kwargs, the pieces the one-line error must name) --------------------------
def undecodable_png(root):
    bad = first(root)
    bad.write_bytes(b"\x89PNG but not really" * 5)
    return {}, [bad.name, "cannot be decoded", "split 'train'"]


def images_directly_in_train(root):
    for class_dir in [p for p in (root / "train").iterdir() if p.is_dir()]:
        for f in class_dir.iterdir():
            f.rename(root / "train" / f"{class_dir.name}_{f.name}")
        class_dir.rmdir()
    return {}, ["image file(s) directly", "no class folders", "/train/<class>/<image>"]


def image_next_to_class_folders(root):
    shutil.copy(first(root, "val"), root / "train" / "stray.png")
    return {}, ["stray.png", "outside any class folder"]


def same_bytes_under_two_classes(root):
    shutil.copy(first(root, cls="PET"), root / "train" / "PP" / "copy_of_pet.png")
    return {}, ["copy_of_pet.png", "same bytes", "class 'PP'", "class 'PET'", "one label per image"]


def val_file_identical_to_train_file(root):
    shutil.copy(first(root, "train", "PP"), root / "val" / "PP" / "leaked.png")
    return {}, ["leaked.png", "split 'val'", "same bytes", "split 'train'"]


def manifest_missing_column(root):
    manifest = write_manifests(root)
    lines = (root / "train.csv").read_text().splitlines()
    (root / "train.csv").write_text("\n".join(line.split(",")[0] for line in lines) + "\n")
    return {"format": "manifest", "manifest": manifest}, ["train.csv", "lacks column(s) ['label']"]


def manifest_path_with_dotdot(root):
    outside = root.parent / "other_owner"
    outside.mkdir()
    shutil.copy(first(root), outside / "img.png")
    manifest = write_manifests(root, "../other_owner/img.png,PET\n")
    row = len((root / "train.csv").read_text().splitlines())
    return ({"format": "manifest", "manifest": manifest},
            ["train.csv", f"row {row}", "'../other_owner/img.png'", "outside data.root"])


def manifest_absolute_path(root):
    outside = root.parent / "elsewhere"
    outside.mkdir()
    shutil.copy(first(root), outside / "img.png")
    manifest = write_manifests(root, f"{outside / 'img.png'},PET\n")
    return {"format": "manifest", "manifest": manifest}, ["train.csv", str(outside / "img.png"), "outside data.root"]


def manifest_symlink_out_of_root(root):
    outside = root.parent / "secret"
    outside.mkdir()
    shutil.copy(first(root), outside / "img.png")
    (root / "train" / "PET" / "link.png").symlink_to(outside / "img.png")
    manifest = write_manifests(root)  # lists the link like any other file
    return ({"format": "manifest", "manifest": manifest},
            ["train.csv", "'train/PET/link.png'", str(outside / "img.png"), "outside data.root"])


def imagefolder_symlink_out_of_root(root):
    outside = root.parent / "secret"
    outside.mkdir()
    shutil.copy(first(root), outside / "img.png")
    (root / "train" / "PET" / "link.png").symlink_to(outside / "img.png")
    return {}, ["split folder", "'train/PET/link.png'", str(outside / "img.png"), "outside data.root"]


def imagefolder_class_folder_symlinked_out_of_root(root):
    outside = root.parent / "other_owner"
    shutil.copytree(root / "train" / "PET", outside)
    (root / "train" / "PET2").symlink_to(outside, target_is_directory=True)
    return {}, ["split folder", "train/PET2/", str(outside), "outside data.root"]


def manifest_file_listed_with_two_labels(root):
    rel = first(root, cls="PET").relative_to(root).as_posix()
    manifest = write_manifests(root, f"{rel},PP\n")
    return {"format": "manifest", "manifest": manifest}, ["train.csv", rel, "label 'PP'", "label 'PET'"]


def manifest_file_listed_twice(root):
    rel = first(root, cls="PET").relative_to(root).as_posix()
    manifest = write_manifests(root, f"./{rel},PET\n")  # another spelling of the same file
    return {"format": "manifest", "manifest": manifest}, ["train.csv", "listed twice", "expected each file once"]


def manifest_row_without_label(root):
    rel = first(root, cls="PET").relative_to(root).as_posix()
    manifest = write_manifests(root, f"{rel},\n")
    row = len((root / "train.csv").read_text().splitlines())
    return {"format": "manifest", "manifest": manifest}, ["train.csv", f"row {row}", "field 'label'", "class name"]


def jsonl_manifest_line_not_json(root):
    manifest = write_manifests(root, '{"path": "train/PET/x.png", "label": PET}\n', kind="jsonl")
    line = len((root / "train.jsonl").read_text().splitlines())
    return {"format": "manifest", "manifest": manifest}, ["train.jsonl", f"line {line}", "not valid JSON"]


def manifest_not_utf8(root):
    manifest = write_manifests(root)
    with open(root / "train.csv", "ab") as handle:
        handle.write("train/PET/caf\u00e9.png,PET\n".encode("latin-1"))
    line = len((root / "train.csv").read_bytes().splitlines())
    return {"format": "manifest", "manifest": manifest}, ["train.csv", f"line {line}", "not UTF-8", "0xe9"]


CASES = [undecodable_png, images_directly_in_train, image_next_to_class_folders, same_bytes_under_two_classes,
         val_file_identical_to_train_file, manifest_missing_column, manifest_path_with_dotdot, manifest_absolute_path,
         manifest_symlink_out_of_root, imagefolder_symlink_out_of_root, imagefolder_class_folder_symlinked_out_of_root,
         manifest_file_listed_with_two_labels, manifest_file_listed_twice,
         manifest_row_without_label, jsonl_manifest_line_not_json, manifest_not_utf8]


@pytest.mark.parametrize("damage", CASES, ids=lambda f: f.__name__)
def test_bad_rgb_input_is_one_line_naming_the_culprit(damage, data_copy):
    kwargs, expected = damage(data_copy)
    with pytest.raises(DataError) as err:
        datamodule(data_copy, **kwargs).setup("fit")
    assert_one_line_naming(str(err.value), expected)


# -- multispectral arrays -------------------------------------------------------------------------------------
@pytest.fixture
def ms_copy(plastic_data_ms, tmp_path) -> Path:
    return Path(shutil.copytree(plastic_data_ms, tmp_path / "ms"))


def _array(root):
    path = first(root, pattern="*.npy")
    return path, np.load(path)


def nan_values(root):
    path, array = _array(root)
    array = array.astype(np.float32)
    array[3, :2, :] = np.nan
    np.save(path, array)
    return path, "non_finite", [path.name, f"{2 * array.shape[2]} of {array.size} values are NaN or inf"]


def inf_values(root):
    path, array = _array(root)
    array = array.astype(np.float32)
    array[0, 0, 0] = np.inf
    np.save(path, array)
    return path, "non_finite", [path.name, f"1 of {array.size} values are NaN or inf"]


def zero_pixels(root):
    path, array = _array(root)
    np.save(path, np.zeros((array.shape[0], 0, 8), dtype=array.dtype))
    return path, "empty_image", [path.name, f"({array.shape[0]}, 0, 8) has no pixels"]


def not_an_array(root):
    path, _ = _array(root)
    path.write_bytes(b"\x93NUMPY garbage")
    return path, "undecodable", [path.name, "cannot be decoded"]


ARRAY_CASES = [nan_values, inf_values, zero_pixels, not_an_array]


@pytest.mark.parametrize("damage", ARRAY_CASES, ids=lambda f: f.__name__)
def test_bad_array_is_refused_naming_the_file(damage, ms_copy):
    _, _, expected = damage(ms_copy)
    with pytest.raises(DataError) as err:
        datamodule(ms_copy, channels=["red", "green", "blue", "nir"], mean=[0.5] * 4, std=[0.25] * 4).setup("fit")
    for piece in expected:
        assert piece in str(err.value), (piece, str(err.value))


def test_skip_leaves_bad_records_out_and_counts_them_per_reason(ms_copy):
    damaged = {}
    for damage in ARRAY_CASES:
        path, reason, _ = damage(ms_copy)
        damaged[reason] = damaged.get(reason, []) + [path]
        shutil.move(path, path.with_name(f"zz_{damage.__name__}.npy"))  # the next damage takes the next file
    cls = max((p.name for p in (ms_copy / "val").iterdir()), key=lambda c: len(list((ms_copy / "val" / c).iterdir())))
    leaked = first(ms_copy, "val", cls, "*.npy")  # (a class with more than this file in val keeps its class set)
    shutil.copy(first(ms_copy, "train", cls, "*.npy"), leaked)
    dm = datamodule(ms_copy, channels=["red", "green", "blue", "nir"], mean=[0.5] * 4, std=[0.25] * 4,
                    on_invalid="skip")
    dm.setup("fit")
    counts = {reason: entry["count"] for reason, entry in dm.invalid_records.items()}
    assert counts == {"non_finite": 2, "empty_image": 1, "undecodable": 1, "shared_across_splits": 1}
    assert dm.invalid_records["shared_across_splits"]["first_paths"] == [leaked.relative_to(ms_copy).as_posix()]
    dataset = dm.lineage().as_dict()
    assert dataset["skipped_files"] == 5 and dataset["invalid_records"]["non_finite"]["count"] == 2
    assert dm.lineage().datacard["skipped_shared_across_splits"] == "1"  # -> MLflow tag aift.data.skipped_...
    assert leaked.relative_to(ms_copy).as_posix() not in dm.splits["val"]["path"]
    for image, _ in dm.dataset("train", train=False):  # what is left decodes and is finite
        assert image.isfinite().all()


def test_a_path_outside_the_root_is_refused_even_with_skip(data_copy):
    kwargs, expected = manifest_path_with_dotdot(data_copy)
    with pytest.raises(DataError, match="outside data.root"):
        datamodule(data_copy, on_invalid="skip", **kwargs).setup("fit")


def test_cli_refuses_a_manifest_row_outside_the_root_and_writes_nothing(data_copy, tmp_path):
    kwargs, expected = manifest_path_with_dotdot(data_copy)
    work = tmp_path / "work"
    work.mkdir()
    result = aift("train", "recipe=plastic_sorting", f"data.root={data_copy}", "data.format=manifest",
                  "data.manifest.train=train.csv", "data.manifest.val=val.csv", "debug=smoke", "hydra.run.dir=out",
                  cwd=work)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
    assert all(piece in result.stderr for piece in expected)
    assert not (work / "mlflow.db").exists()  # nothing tracked: a new store is made only when a run starts
    written = [p.relative_to(work / "out").as_posix() for p in (work / "out").rglob("*") if p.is_file()]
    # Hydra's own record of the command and the log only: no checkpoint, no summary, no provenance
    assert [p for p in written if not p.startswith(".hydra/") and not p.endswith(".log")] == [], written


def test_skips_reach_summary_and_mlflow(data_copy, tmp_path):
    """A skipped file is counted per reason in summary.json's dataset section and in the MLflow run's tags."""
    undecodable_png(data_copy)
    val_file_identical_to_train_file(data_copy)
    work = tmp_path / "work"
    work.mkdir()
    result = aift("train", "recipe=plastic_sorting", f"data.root={data_copy}", "data.on_invalid=skip", "debug=smoke",
                  "hydra.run.dir=out", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    dataset = json.loads((work / "out" / "summary.json").read_text())["dataset"]
    assert dataset["skipped_files"] == 2
    assert {r: e["count"] for r, e in dataset["invalid_records"].items()} == {"undecodable": 1,
                                                                              "shared_across_splits": 1}
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("plastic_sorting").experiment_id])
    assert run.data.tags["aift.data.skipped_files"] == "2"
    assert run.data.tags["aift.data.skipped_undecodable"] == "1"
    assert run.data.tags["aift.data.skipped_shared_across_splits"] == "1"


def test_skip_counts_both_copies_of_an_image_with_two_labels(data_copy):
    """Both copies are left out (which label is right is unknown), so both are counted: what skipped_files says is
    what left the dataset."""
    source = first(data_copy, "train", "PET")
    copy = data_copy / "train" / "PP" / "copy_of_pet.png"
    shutil.copy(source, copy)
    dm = datamodule(data_copy, on_invalid="skip")
    dm.setup("fit")
    entry = dm.invalid_records["conflicting_labels"]
    assert entry["count"] == 2
    assert sorted(entry["first_paths"]) == sorted([source.relative_to(data_copy).as_posix(),
                                                   copy.relative_to(data_copy).as_posix()])
    assert dm.lineage().as_dict()["skipped_files"] == 2
    kept = set(dm.splits["train"]["path"])
    assert source.relative_to(data_copy).as_posix() not in kept and "train/PP/copy_of_pet.png" not in kept
