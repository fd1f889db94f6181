"""`aift data check`: the health report of a recipe's data, on the small synthetic datasets of conftest.py.

The counts are compared with what the fixtures wrote (files, COCO images, JSONL lines), counted here independently
of the readers; leakage is planted by copying a train example into val; terms that forbid the recipe are written
into a copy's data card. The check runs in this process through the CLI's own entry (``main``): the same code path
as the command, without paying the imports again per test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from aifactory_train.commands.cli import main
from aifactory_train.data.data_check import REPORT_JSON, REPORT_MD
from conftest import aift

SPLITS = ("train", "val", "test")


def fixture_counts(recipe: str, root: Path) -> dict[str, int]:
    if recipe == "plastic_sorting":
        return {s: sum(1 for p in (root / s).glob("*/*") if p.is_file()) for s in SPLITS}
    if recipe == "crop_detection":
        return {s: len(json.loads((root / "annotations" / f"{s}.json").read_text())["images"]) for s in SPLITS}
    return {s: sum(1 for line in (root / f"{s}.jsonl").read_text().splitlines() if line.strip()) for s in SPLITS}


def check(recipe: str, root: Path, out: Path, *overrides: str) -> tuple[int, dict]:
    code = main(["data", "check", f"recipe={recipe}", f"data.root={root}", *overrides, "--out", str(out)])
    return code, json.loads((out / REPORT_JSON).read_text())


def decodes(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        image.load()  # every pixel, not only the header
        return image.size


@pytest.mark.parametrize("recipe", ["plastic_sorting", "crop_detection", "clinical_notes"])
def test_the_report_counts_what_the_fixture_wrote_and_its_files_are_there(recipe, data_roots, tmp_path, capsys):
    root = data_roots[recipe]
    code, report = check(recipe, root, tmp_path / "out")
    assert code == 0, report["problems"]
    assert report["schema_version"] == 1 and report["status"] == "healthy" and report["recipe"] == recipe
    assert {s: report["splits"][s]["count"] for s in SPLITS} == fixture_counts(recipe, root)
    assert all(found["count"] == 0 for found in report["leakage"].values()) and len(report["leakage"]) == 3
    assert report["usage_terms"]["allowed"] and report["datacard"]["owner"]
    assert (tmp_path / "out" / REPORT_MD).read_text().startswith(f"# Data check: {recipe}")
    pictures = report["pictures"]
    assert pictures and all(decodes(tmp_path / "out" / name)[0] > 100 for name in pictures.values())
    if recipe == "plastic_sorting":
        classes = report["splits"]["train"]["classes"]["counts"]
        per_class = {c.name: sum(1 for _ in c.iterdir()) for c in (root / "train").iterdir()}
        assert classes == per_class and report["splits"]["val"]["image_sizes"]["measured"] == fixture_counts(recipe, root)["val"]
        assert set(pictures) == {"class_histogram", "contact_sheet"}
    if recipe == "crop_detection":
        coco = json.loads((root / "annotations" / "train.json").read_text())
        assert report["splits"]["train"]["boxes"]["count"] == len(coco["annotations"])
        assert sum(report["splits"]["train"]["classes"]["counts"].values()) == len(coco["annotations"])
        assert set(pictures) == {"class_histogram", "box_sizes", "contact_sheet"}
    if recipe == "clinical_notes":
        # lengths only: no text of any note or summary in the report, the Markdown or what was printed
        assert set(pictures) == {"lengths"} and report["contact_sheet"]["file"] is None
        assert "sensitive" in report["contact_sheet"]["reason"]
        first = json.loads((root / "train.jsonl").read_text().splitlines()[0])
        written = (tmp_path / "out" / REPORT_JSON).read_text() + (tmp_path / "out" / REPORT_MD).read_text()
        for text in (first["note"], first["summary"]):
            snippet = text.strip()[:40]
            assert snippet not in written and snippet not in capsys.readouterr().out
        lengths = report["splits"]["train"]["lengths"]["note_chars"]
        assert lengths["n"] == fixture_counts(recipe, root)["train"] and lengths["max"] >= lengths["min"] > 0


def test_planted_leakage_and_an_unreadable_file_are_found(data_copy, tmp_path):
    """A train image copied into val (another name, same bytes) leaks: the recipe's reader refuses it (exit 1, both
    paths named). With data.on_invalid=skip the reader leaves it and a corrupt file out: each is reported by its
    reason with its path, as a warning, and the counts are what is left."""
    source = sorted((data_copy / "train" / "PET").iterdir())[0]
    shutil.copy(source, data_copy / "val" / "PET" / "copied_from_train.png")
    code, report = check("plastic_sorting", data_copy, tmp_path / "out")
    assert code == 1 and report["status"] == "problems"
    (problem,) = report["problems"]
    assert "copied_from_train.png" in problem["message"] and f"train/PET/{source.name}" in problem["message"]
    broken = sorted((data_copy / "test" / "PP").iterdir())[0]
    broken.write_bytes(b"not a png")
    code, report = check("plastic_sorting", data_copy, tmp_path / "skip", "data.on_invalid=skip")
    assert code == 0 and report["problems"] == [], report["problems"]
    examples = sorted(e for entry in report["invalid"].values() for e in entry["examples"])
    assert len(report["invalid"]) == 2 and all(entry["count"] == 1 for entry in report["invalid"].values())
    assert examples[0].endswith(f"test/PP/{broken.name}") and examples[1].endswith("val/PET/copied_from_train.png")
    assert any(w["check"] == "invalid" for w in report["warnings"])
    assert report["splits"]["test"]["count"] == fixture_counts("plastic_sorting", data_copy)["test"] - 1


def test_a_note_copied_from_train_into_val_leaks(clinical_data, tmp_path):
    data = Path(shutil.copytree(clinical_data, tmp_path / "notes"))
    line = (data / "train.jsonl").read_text().splitlines()[4]
    with open(data / "val.jsonl", "a") as handle:
        handle.write(line + "\n")
    code, report = check("clinical_notes", data, tmp_path / "out")
    val_lines = fixture_counts("clinical_notes", data)["val"]
    assert code == 1  # the recipe's reader refuses it, naming both records (never the text)
    (problem,) = report["problems"]
    assert "line 5" in problem["message"] and f"line {val_lines}" in problem["message"], problem


def test_terms_that_forbid_the_recipe_are_reported_and_the_data_is_not_read(crop_copy, tmp_path):
    card = yaml.safe_load((crop_copy / "datacard.yaml").read_text())
    (crop_copy / "datacard.yaml").write_text(yaml.safe_dump({**card, "usage": {"recipes": ["plastic_sorting"]}}))
    code, report = check("crop_detection", crop_copy, tmp_path / "out")
    assert code == 1
    terms = report["usage_terms"]
    assert terms["allowed"] is False and terms["terms"] == "recipes=plastic_sorting"
    assert "usage.recipes allows ['plastic_sorting'], not recipe 'crop_detection'" in terms["refusal"]
    assert report["problems"][0]["check"] == "usage_terms" and report["splits"] == {}
    assert "refused" in (tmp_path / "out" / REPORT_MD).read_text()


def test_raw_notes_that_training_refuses_give_exit_1_with_the_readers_reason(clinical_raw, tmp_path):
    code, report = check("clinical_notes", clinical_raw, tmp_path / "out")
    assert code == 1 and report["problems"][0]["check"] == "read"
    assert "is not marked de-identified" in report["problems"][0]["message"]


def test_leakage_uses_the_digests_hashes_without_reading_a_file_twice(crop_data, tmp_path, monkeypatch):
    from aifactory_train.records import lineage

    reads = []
    real = lineage.file_sha256
    monkeypatch.setattr(lineage, "file_sha256", lambda path: reads.append(path) or real(path))
    monkeypatch.setenv("AIFT_DIGEST_CACHE", "0")  # no cache on disk: every hash must come from this process
    code, report = check("crop_detection", crop_data, tmp_path / "out")
    assert code == 0
    files = sum(fixture_counts("crop_detection", crop_data).values())
    assert len(reads) == len(set(reads)) == files


def test_launch_refuses_leaking_data_before_anything_is_queued(data_copy, tmp_path):
    source = sorted((data_copy / "train" / "PS").iterdir())[0]
    shutil.copy(source, data_copy / "test" / "PS" / "again.png")
    result = aift("launch", "recipe=plastic_sorting", "cluster=aifactory_h100", "trainer.num_nodes=1", "strategy=ddp",
                  f"data.root={data_copy}", cwd=tmp_path, env={"PATH": str(tmp_path / "no-such-bin")})
    assert result.returncode == 2, result.stderr[-2000:]
    # the recipe's reader names the two files (a reader that does not check is caught by the digests' leakage check)
    assert "test/PS/again.png' (split 'test') has the same bytes" in result.stderr, result.stderr
    assert f"train/PS/{source.name}" in result.stderr and "Traceback" not in result.stderr
    assert "sbatch was not found" not in result.stderr and not (tmp_path / "outputs").exists()


def test_the_leakage_check_finds_files_of_the_same_content_in_two_splits(tmp_path):
    """The framework's own leakage check, for recipes whose reader does not look (the shipped readers refuse such
    data first, see above): same bytes under another name in two splits, and twice within one split."""
    from aifactory_train.data.data_check import SplitDescription, duplicates_and_leakage

    for name, content in (("a.png", b"one"), ("b.png", b"two"), ("c.png", b"one"), ("d.png", b"three"),
                          ("e.png", b"three")):
        (tmp_path / name).write_bytes(content)
    splits = {"train": SplitDescription(count=2, files=["a.png", "b.png"]),
              "val": SplitDescription(count=3, files=["c.png", "d.png", "e.png"])}
    duplicates, leakage, checked = duplicates_and_leakage(tmp_path, splits)
    assert leakage == {"train/val": {"count": 1, "examples": [["a.png", "c.png"]]}}
    assert duplicates["val"]["groups"] == 1 and duplicates["val"]["examples"] == [["d.png", "e.png"]]
    assert duplicates["train"]["groups"] == 0 and checked == ["train", "val"]
