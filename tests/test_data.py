"""plastic_sorting data: layouts, checks on bad input, transforms, lineage digests."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from aifactory_train.errors import DataError
from aifactory_train.records.lineage import digest_files
from aifactory_train.recipes.plastic_sorting.data import PlasticSortingDataModule

CLASSES = ["HDPE", "LDPE", "PET", "PP", "PS", "PVC", "other"]


def datamodule(root, **kwargs) -> PlasticSortingDataModule:
    defaults = dict(image_size=32, batch_size=8, num_workers=0)
    defaults.update(kwargs)
    return PlasticSortingDataModule(root=str(root), **defaults)


def test_imagefolder_loads_splits_and_classes_from_the_data(plastic_data):
    dm = datamodule(plastic_data)
    dm.setup("fit")
    assert dm.class_names == CLASSES
    assert {s: len(d) for s, d in dm.splits.items()} == {"train": 70, "val": 18, "test": 18}
    assert dm.splits["train"].features["label"].names == CLASSES
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.uint8  # workers ship uint8
    assert labels.dtype == torch.int64 and labels.max() < 7
    images, _ = dm.on_after_batch_transfer((images, labels), 0)  # on the device: float, normalised
    assert images.dtype == torch.float32 and -2.5 < images.mean() < 2.5


def test_class_set_comes_from_the_folders(data_copy):
    for split in ("train", "val", "test"):
        shutil.rmtree(data_copy / split / "PVC")
        (data_copy / split / "PVC2").mkdir()
        # moved, not copied: the same bytes under two classes would be refused as conflicting labels
        shutil.move(next((data_copy / split / "PET").iterdir()), data_copy / split / "PVC2" / "x.png")
    dm = datamodule(data_copy)
    dm.setup("fit")
    assert "PVC2" in dm.class_names and "PVC" not in dm.class_names


def test_multispectral_npy_gives_four_channel_batches(plastic_data_ms):
    dm = datamodule(plastic_data_ms, channels=["r", "g", "b", "nir"], mean=[0.5] * 4, std=[0.25] * 4)
    dm.setup("fit")
    images, _ = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert images.shape[1:] == (4, 32, 32)
    # the NIR band carries information: it is not constant across the batch
    assert images[:, 3].std() > 0.1


def test_npy_files_with_the_wrong_band_count_are_named(plastic_data_ms):
    dm = datamodule(plastic_data_ms)  # 3 channels configured, files have 4
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    assert ".npy" in str(err.value) and "(4," in str(err.value) and "data.channels" in str(err.value)


def write_manifest(root: Path, split: str, kind: str) -> Path:
    rows = [{"path": p.relative_to(root).as_posix(), "label": p.parent.name} for p in sorted((root / split).glob("*/*.png"))]
    if kind == "csv":
        path = root / f"{split}.csv"
        path.write_text("path,label\n" + "".join(f"{r['path']},{r['label']}\n" for r in rows))
    else:
        path = root / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_manifest_layout_matches_imagefolder(data_copy, kind):
    manifest = {s: write_manifest(data_copy, s, kind).name for s in ("train", "val", "test")}
    from_manifest = datamodule(data_copy, format="manifest", manifest=manifest)
    from_manifest.setup("fit")
    from_folders = datamodule(data_copy)
    from_folders.setup("fit")
    assert from_manifest.class_names == from_folders.class_names
    assert from_manifest.lineage().digest == from_folders.lineage().digest


def test_manifest_row_with_missing_file_names_file_and_row(data_copy):
    path = write_manifest(data_copy, "train", "csv")
    path.write_text(path.read_text() + "train/PET/ghost.png,PET\n")
    write_manifest(data_copy, "val", "csv")
    dm = datamodule(data_copy, format="manifest", manifest={"train": "train.csv", "val": "val.csv"})
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    assert "train.csv" in str(err.value) and "row 72" in str(err.value) and "ghost.png" in str(err.value)


def test_manifest_without_label_column(data_copy):
    (data_copy / "train.csv").write_text("path,kind\ntrain/PET/x.png,PET\n")
    write_manifest(data_copy, "val", "csv")
    dm = datamodule(data_copy, format="manifest", manifest={"train": "train.csv", "val": "val.csv"})
    with pytest.raises(DataError, match=r"lacks column\(s\) \['label'\]"):
        dm.setup("fit")


def test_missing_root_gives_the_synth_hint(tmp_path):
    with pytest.raises(DataError) as err:
        datamodule(tmp_path / "nowhere").setup("fit")
    assert "nowhere" in str(err.value) and "aift data synth plastic_sorting" in str(err.value)


def test_missing_val_split(data_copy):
    shutil.rmtree(data_copy / "val")
    with pytest.raises(DataError, match="missing split folder 'val/'"):
        datamodule(data_copy).setup("fit")


def test_empty_split(data_copy):
    shutil.rmtree(data_copy / "val")
    (data_copy / "val").mkdir()
    with pytest.raises(DataError, match=r"split '.*val' is empty"):
        datamodule(data_copy).setup("fit")


def test_class_folder_without_images(data_copy):
    for f in (data_copy / "train" / "PP").iterdir():
        f.unlink()
    (data_copy / "train" / "PP" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError) as err:
        datamodule(data_copy).setup("fit")
    assert "train/PP" in str(err.value) and "has no images" in str(err.value)


def test_different_class_sets_across_splits(data_copy):
    shutil.rmtree(data_copy / "test" / "PS")
    with pytest.raises(DataError) as err:
        datamodule(data_copy).setup("fit")
    assert "split 'test'" in str(err.value) and "missing: ['PS']" in str(err.value)


def corrupt_two_files(root: Path) -> list[Path]:
    truncated = sorted((root / "train" / "PET").glob("*.png"))[0]
    truncated.write_bytes(truncated.read_bytes()[:100])
    garbage = sorted((root / "val" / "PP").glob("*.png"))[0]
    garbage.write_bytes(b"this is not a png" * 10)
    return [truncated, garbage]


def test_corrupt_images_fail_by_default_naming_the_files(data_copy):
    bad = corrupt_two_files(data_copy)
    with pytest.raises(DataError) as err:
        datamodule(data_copy).setup("fit")
    message = str(err.value)
    assert "cannot be decoded" in message and "data.on_invalid=skip" in message
    assert bad[0].name in message  # the first bad file stops the run, named


def test_corrupt_images_are_skipped_counted_and_logged(data_copy, caplog):
    bad = corrupt_two_files(data_copy)
    dm = datamodule(data_copy, on_invalid="skip")
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert len(dm.splits["train"]) == 69 and len(dm.splits["val"]) == 17
    assert sorted(Path(p).name for p in dm.skipped) == sorted(p.name for p in bad)
    assert dm.invalid_records["undecodable"]["count"] == 2
    assert "left out 2 record(s)" in caplog.text and bad[0].name in caplog.text
    lineage = dm.lineage()
    assert lineage.as_dict()["skipped_files"] == 2
    assert lineage.as_dict()["invalid_records"]["undecodable"]["count"] == 2
    assert lineage.datacard["skipped_undecodable"] == "2"  # an MLflow tag (aift.data.skipped_undecodable)
    # every remaining file decodes
    for _ in dm.dataset("train", train=True):
        pass


def test_augmentation_keeps_shape_and_mixup_gives_soft_labels(plastic_data):
    dm = datamodule(plastic_data, mixup_alpha=0.4, cutmix_alpha=1.0)
    dm.setup("fit")
    images, labels = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert labels.ndim == 1  # without a training trainer (validation, eval) batches are not mixed
    images, targets = dm.batch_mix(images, labels)
    assert images.shape == (8, 3, 32, 32)
    assert targets.shape == (8, 7) and torch.allclose(targets.sum(dim=1), torch.ones(8))


def test_digest_covers_every_byte_of_every_file(data_copy):
    dm = datamodule(data_copy)
    dm.setup("fit")
    before = dm.lineage()
    last = sorted((data_copy / "test" / "other").glob("*.png"))[-1]
    data = bytearray(last.read_bytes())
    data[-5] ^= 0xFF  # one byte in the last file of the last split
    last.write_bytes(bytes(data))
    after = digest_files(data_copy, dm.splits["test"]["path"], dm.splits["test"]["label"])
    assert after != before.splits["test"].digest
    assert before.splits["train"].digest == digest_files(data_copy, dm.splits["train"]["path"], dm.splits["train"]["label"])


def test_digest_depends_on_labels(plastic_data):
    paths = ["train/PET/" + p.name for p in sorted((plastic_data / "train" / "PET").glob("*.png"))]
    assert digest_files(plastic_data, paths, [0] * len(paths)) != digest_files(plastic_data, paths, [1] * len(paths))


class CountingHash:
    """Wraps the real file hash and records which files it read."""

    def __init__(self, monkeypatch):
        import aifactory_train.records.lineage as lineage

        self.read: list[str] = []
        real = lineage.file_sha256

        def counting(path):
            self.read.append(Path(path).name)
            return real(path)

        monkeypatch.setattr(lineage, "file_sha256", counting)


@pytest.fixture
def digest_cache(tmp_path, monkeypatch) -> Path:
    from aifactory_train.records.lineage import DigestCache

    monkeypatch.setenv("AIFT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("AIFT_DIGEST_CACHE", raising=False)
    monkeypatch.setattr(DigestCache, "RACY_NS", 0)  # the test's files were written a moment ago
    return tmp_path / "cache"


def split_files(root: Path) -> tuple[list[str], list[int]]:
    paths = sorted(p.relative_to(root).as_posix() for p in (root / "train").rglob("*.png"))
    return paths, [len(p) % 7 for p in paths]


def test_digest_cache_reads_only_new_or_changed_files_and_gives_the_same_digest(data_copy, digest_cache, monkeypatch):
    paths, labels = split_files(data_copy)
    monkeypatch.setenv("AIFT_DIGEST_CACHE", "0")
    uncached = digest_files(data_copy, paths, labels)
    monkeypatch.delenv("AIFT_DIGEST_CACHE")

    counter = CountingHash(monkeypatch)
    assert digest_files(data_copy, paths, labels) == uncached
    assert len(counter.read) == len(paths)
    counter.read.clear()
    assert digest_files(data_copy, paths, labels) == uncached
    assert counter.read == []  # nothing changed: no file is read again

    # an edit that keeps the size and puts the mtime back is still seen (ctime and inode change with it)
    target = data_copy / paths[3]
    before = target.stat()
    data = bytearray(target.read_bytes())
    data[-5] ^= 0xFF
    target.write_bytes(bytes(data))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert target.stat().st_size == before.st_size and target.stat().st_mtime_ns == before.st_mtime_ns
    changed = digest_files(data_copy, paths, labels)
    assert changed != uncached and counter.read == [target.name]
    monkeypatch.setenv("AIFT_DIGEST_CACHE", "0")
    assert changed == digest_files(data_copy, paths, labels)


def test_digest_cache_holds_no_file_names(data_copy, digest_cache):
    paths, labels = split_files(data_copy)
    digest_files(data_copy, paths, labels)
    (cache_file,) = (digest_cache / "digests").glob("*.json")
    text = cache_file.read_text()
    assert len(json.loads(text)["files"]) == len(paths)
    assert not any(Path(p).stem in text for p in paths) and str(data_copy) not in text


@pytest.mark.parametrize("damage", ["not json {", '{"version": 99, "files": {}}', '["a list"]'])
def test_damaged_digest_cache_is_rebuilt_with_a_warning(data_copy, digest_cache, damage, caplog):
    paths, labels = split_files(data_copy)
    expected = digest_files(data_copy, paths, labels)
    (cache_file,) = (digest_cache / "digests").glob("*.json")
    cache_file.write_text(damage)
    with caplog.at_level(logging.WARNING, logger="aifactory_train.records.lineage"):
        assert digest_files(data_copy, paths, labels) == expected
    assert str(cache_file) in caplog.text and "hashing every file again" in caplog.text
    assert len(json.loads(cache_file.read_text())["files"]) == len(paths)


def test_unwritable_digest_cache_still_gives_the_digest(data_copy, tmp_path, monkeypatch, caplog):
    from aifactory_train.records.lineage import DigestCache

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("AIFT_CACHE_DIR", str(blocker))
    monkeypatch.setattr(DigestCache, "RACY_NS", 0)
    paths, labels = split_files(data_copy)
    with caplog.at_level(logging.WARNING, logger="aifactory_train.records.lineage"):
        cached = digest_files(data_copy, paths, labels)
    assert "could not be written" in caplog.text and str(blocker) in caplog.text
    monkeypatch.setenv("AIFT_DIGEST_CACHE", "0")
    assert cached == digest_files(data_copy, paths, labels)


def test_files_changed_a_moment_ago_are_hashed_but_not_cached(data_copy, tmp_path, monkeypatch):
    monkeypatch.setenv("AIFT_CACHE_DIR", str(tmp_path / "cache"))
    paths, labels = split_files(data_copy)
    fresh = data_copy / paths[0]
    fresh.write_bytes(fresh.read_bytes())  # changed now: within the same timestamp tick as a next edit could be
    counter = CountingHash(monkeypatch)
    digest_files(data_copy, paths, labels)
    counter.read.clear()
    digest_files(data_copy, paths, labels)
    assert fresh.name in counter.read


def test_datacard_is_read_into_lineage(plastic_data):
    dm = datamodule(plastic_data)
    dm.setup("fit")
    card = dm.lineage().datacard
    assert card["license"] == "CC0-1.0" and "synthetic" in card["consent"]


def _plant(cache_file: Path, digest: str) -> None:
    """Replace every cached SHA-256 with ``digest``, keeping the stat keys: what a poisoner would write."""
    data = json.loads(cache_file.read_text())
    data["files"] = {key: [*entry[:-1], digest] for key, entry in data["files"].items()}
    cache_file.write_text(json.dumps(data))


@pytest.mark.parametrize("exposure", ["folder others may write", "file others may write", "file of another user"])
def test_a_digest_cache_others_can_write_is_not_trusted(data_copy, digest_cache, exposure, caplog):
    paths, labels = split_files(data_copy)
    expected = digest_files(data_copy, paths, labels)
    assert (digest_cache / "digests").stat().st_mode & 0o777 == 0o700  # created private
    (cache_file,) = (digest_cache / "digests").glob("*.json")
    assert cache_file.stat().st_mode & 0o077 == 0
    _plant(cache_file, "0" * 64)
    if exposure == "folder others may write":
        os.chmod(digest_cache / "digests", 0o777)
    elif exposure == "file others may write":
        os.chmod(cache_file, 0o666)
    elif os.getuid() != 0:
        pytest.skip("giving a file to another user needs root (as CI runs)")
    else:
        os.chown(cache_file, 4242, -1)
    with caplog.at_level(logging.WARNING, logger="aifactory_train.records.lineage"):
        assert digest_files(data_copy, paths, labels) == expected  # the planted digests were not used
    assert "is not used" in caplog.text


def test_a_cache_entry_is_bound_to_the_files_device(data_copy, digest_cache):
    paths, labels = split_files(data_copy)
    expected = digest_files(data_copy, paths, labels)
    (cache_file,) = (digest_cache / "digests").glob("*.json")
    data = json.loads(cache_file.read_text())
    # the same size, times and inode on another device (another filesystem mounted at the same place)
    data["files"] = {key: [*entry[:4], entry[4] + 1, "0" * 64] for key, entry in data["files"].items()}
    cache_file.write_text(json.dumps(data))
    assert digest_files(data_copy, paths, labels) == expected


def test_refresh_rereads_every_file_and_rewrites_the_cache(data_copy, digest_cache, monkeypatch):
    paths, labels = split_files(data_copy)
    expected = digest_files(data_copy, paths, labels)
    (cache_file,) = (digest_cache / "digests").glob("*.json")
    _plant(cache_file, "0" * 64)
    monkeypatch.setenv("AIFT_DIGEST_CACHE", "refresh")
    counter = CountingHash(monkeypatch)
    assert digest_files(data_copy, paths, labels) == expected
    assert len(counter.read) == len(paths)
    monkeypatch.delenv("AIFT_DIGEST_CACHE")
    counter.read.clear()
    assert digest_files(data_copy, paths, labels) == expected and counter.read == []  # the rewritten cache


def test_data_digest_recompute_repairs_a_cache_that_went_wrong(data_copy, tmp_path):
    """`aift data digest` prints the digests a training run records, from the cache; --recompute reads every byte
    and rewrites the cache, the remedy when a cache is suspected (here: entries changed by hand)."""
    from aifactory_train.records.lineage import DigestCache
    from conftest import aift

    import time

    time.sleep(DigestCache.RACY_NS / 1e9 + 0.1)  # the copied files become old enough to be cached
    env = {"AIFT_CACHE_DIR": str(tmp_path / "cache")}
    args = ["data", "digest", "recipe=plastic_sorting", f"data.root={data_copy}"]
    first = aift(*args, "--recompute", "--out", "first.json", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    truth = json.loads((tmp_path / "first.json").read_text())
    assert truth["splits"]["train"]["num_rows"] > 0
    cache_files = list((tmp_path / "cache" / "digests").glob("*.json"))
    if not cache_files or not json.loads(cache_files[0].read_text())["files"]:
        pytest.skip("the synthetic files are younger than DigestCache.RACY_NS, so none was cached")
    _plant(cache_files[0], "0" * 64)
    poisoned = aift(*args, "--out", "poisoned.json", cwd=tmp_path, env=env)
    assert json.loads((tmp_path / "poisoned.json").read_text())["digest"] != truth["digest"]
    repaired = aift(*args, "--recompute", "--out", "repaired.json", cwd=tmp_path, env=env)
    assert repaired.returncode == 0 and poisoned.returncode == 0
    assert json.loads((tmp_path / "repaired.json").read_text())["digest"] == truth["digest"]
    again = aift(*args, "--out", "again.json", cwd=tmp_path, env=env)
    assert again.returncode == 0
    assert json.loads((tmp_path / "again.json").read_text())["digest"] == truth["digest"]
    assert DigestCache.VERSION == json.loads(cache_files[0].read_text())["version"]


def test_refresh_keeps_the_entries_of_files_it_was_not_asked_for(data_copy, digest_cache, monkeypatch):
    """`aift data digest --recompute` asks for each split through a cache of its own: refreshing one split must not
    drop the others' entries."""
    train = sorted(p.relative_to(data_copy).as_posix() for p in (data_copy / "train").rglob("*.png"))
    val = sorted(p.relative_to(data_copy).as_posix() for p in (data_copy / "val").rglob("*.png"))
    digest_files(data_copy, train, [0] * len(train))
    digest_files(data_copy, val, [0] * len(val))
    monkeypatch.setenv("AIFT_DIGEST_CACHE", "refresh")
    digest_files(data_copy, val, [0] * len(val))
    monkeypatch.delenv("AIFT_DIGEST_CACHE")
    counter = CountingHash(monkeypatch)
    digest_files(data_copy, train, [0] * len(train))
    assert counter.read == []  # train's entries survived the refresh of val
