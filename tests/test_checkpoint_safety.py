"""A checkpoint is data: loading one (eval, predict, export, resume, consolidate) may neither write files outside
the run nor run code, whoever crafted it. The crafted checkpoints here start from real ones written by short CPU
runs with one entry changed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import aift

SMOKE = ["recipe=clinical_notes", "debug=smoke", "trainer.accelerator=cpu", "run_test=false",
         "trainer.limit_val_batches=1", "recipe.module.rouge_max_batches=0", "trainer.limit_train_batches=2"]


def one_line_error(result) -> str:
    """The CLI's refusal: exit 2, one `error:` line, no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


# -- item 1: a checkpoint's tokenizer cannot write files ------------------------------------------------------
@pytest.fixture(scope="module")
def notes_checkpoint(clinical_data, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("notes_ckpt")
    result = aift("train", *SMOKE, f"data.root={clinical_data}", "tracking=none", "hydra.run.dir=run", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "run" / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("command", ["eval", "predict", "export"])
@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_a_crafted_tokenizer_file_name_writes_nothing(command, kind, notes_checkpoint, clinical_data, tmp_path):
    """A checkpoint whose tokenizer names a file `../../x` or `/abs/x` is refused with one line naming the checkpoint
    and the entry; nothing is written there (the old code wrote both files and exited 0)."""
    temp = tmp_path / "a" / "b" / "tmp"  # the process's temporary folder: ../../ from a folder in it is tmp_path/a
    temp.mkdir(parents=True)
    escaped = tmp_path / "a" / "escaped.txt"
    name = "../../escaped.txt" if kind == "relative" else str(tmp_path / "absolute.txt")
    target = escaped if kind == "relative" else tmp_path / "absolute.txt"
    state = torch.load(notes_checkpoint, map_location="cpu", weights_only=True)
    state["aift_tokenizer"] = {**state["aift_tokenizer"], name: "written by a checkpoint"}
    crafted = tmp_path / "crafted.ckpt"
    torch.save(state, crafted)
    args = {"eval": [f"data.root={clinical_data}", "tracking=none"],
            "predict": [f"input={clinical_data / 'test.jsonl'}"],
            "export": ["format=hf"]}[command]
    result = aift(command, "recipe=clinical_notes", f"ckpt_path={crafted}", *args, "hydra.run.dir=out", cwd=tmp_path,
                  env={"TMPDIR": str(temp)})
    error = one_line_error(result)
    assert str(crafted) in error and repr(name) in error and "tokenizer" in error, error
    assert not target.exists()
    assert not (tmp_path / "out" / "model").exists() and not (tmp_path / "out" / "predictions.jsonl").exists()


def test_the_genuine_checkpoint_still_evaluates(notes_checkpoint, clinical_data, tmp_path):
    """The allowlist of tokenizer file names admits what the recipe writes: a genuine checkpoint evaluates."""
    result = aift("eval", "recipe=clinical_notes", f"data.root={clinical_data}", f"ckpt_path={notes_checkpoint}",
                  "tracking=none", "trainer.limit_test_batches=1", "hydra.run.dir=out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("key", ["tokenizer_file", "auto_map"])
def test_a_tokenizer_config_may_not_point_outside_its_folder(key, notes_checkpoint, tmp_path):
    """transformers can read tokenizer_config.json's `*_file` keys as paths (anywhere; transformers 5.24 ignored this
    one here, other versions and classes do not) and `auto_map` as code to import: a checkpoint's tokenizer setting
    them is refused with a line naming the key, whatever the installed transformers does with it."""
    import json

    from aifactory_train.errors import AiftError
    from aifactory_train.recipes.clinical_notes.data import tokenizer_from_files

    files = dict(torch.load(notes_checkpoint, map_location="cpu", weights_only=True)["aift_tokenizer"])
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "tokenizer.json").write_text(files["tokenizer.json"])
    config = json.loads(files["tokenizer_config.json"])
    config[key] = str(outside / "tokenizer.json") if key == "tokenizer_file" else {"AutoTokenizer": "x--y.Z"}
    files["tokenizer_config.json"] = json.dumps(config)
    del files["tokenizer.json"]  # so the only tokenizer.json is the outside one
    with pytest.raises(AiftError, match=f"tokenizer_config.json sets {key}="):
        tokenizer_from_files(files)
