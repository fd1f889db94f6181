"""A checkpoint is data: loading one (eval, predict, export, resume, consolidate) may neither write files outside
the run nor run code, whoever crafted it. The crafted checkpoints here start from real ones written by short CPU
runs (a clinical_notes Lightning file, a DeepSpeed ZeRO-2 folder) with one entry changed."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import aift

SMOKE = ["recipe=clinical_notes", "debug=smoke", "trainer.accelerator=cpu", "run_test=false",
         "trainer.limit_val_batches=1", "recipe.module.rouge_max_batches=0", "trainer.limit_train_batches=2"]
ZERO2 = [*SMOKE, "trainer.devices=1", "strategy=deepspeed_zero2", "strategy.cpu_smoke=true"]

# A pickle payload that, when unpickled with weights_only=False, creates the marker file (the attack).
CRAFT = """
import sys, torch
class Payload:
    def __reduce__(self):
        return (exec, ("open(%r, 'w').write('ran')" % sys.argv[2],))
state = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
state["payload"] = Payload()
torch.save(state, sys.argv[1])
"""


def craft_shard(shard: Path, marker: Path) -> None:
    """Add the payload to a real shard, in another process (this one must not hold the payload's class)."""
    import subprocess

    subprocess.run([sys.executable, "-c", CRAFT, str(shard), str(marker)], check=True, capture_output=True)
    assert not marker.exists()


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


# -- item 2: no code runs from a DeepSpeed checkpoint ---------------------------------------------------------
@pytest.fixture(scope="module")
def zero2_run(clinical_data, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("zero2")
    result = aift("train", *ZERO2, f"data.root={clinical_data}", "tracking=none", "hydra.run.dir=run", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (work / "run" / "checkpoints" / "last.ckpt").is_dir()
    return work / "run"


@pytest.mark.parametrize("shard", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_consolidate_refuses_a_shard_that_would_run_code(shard, zero2_run, tmp_path):
    folder = Path(shutil.copytree(zero2_run / "checkpoints" / "last.ckpt", tmp_path / "last.ckpt"))
    marker = tmp_path / "MARKER"
    craft_shard(folder / "checkpoint" / shard, marker)
    out = tmp_path / "out.ckpt"
    result = aift("checkpoint", "consolidate", str(folder), "--out", str(out), cwd=tmp_path)
    error = one_line_error(result)
    assert f"checkpoint/{shard}" in error and "global exec" in error and "--trust-checkpoint" in error, error
    assert not marker.exists() and not out.exists() and not list(tmp_path.glob("out.ckpt*"))
    # the flag says what it does: the file is loaded as it is (so its code runs), and the output names it
    result = aift("checkpoint", "consolidate", str(folder), "--out", str(out), "--trust-checkpoint", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--trust-checkpoint: loaded unverified" in result.stderr and shard in result.stderr
    assert marker.exists() and out.exists()


def test_a_genuine_deepspeed_checkpoint_passes_the_check(zero2_run, tmp_path):
    """ZeRO-2's own shards need only the allowlisted DeepSpeed types: it consolidates without --trust-checkpoint."""
    from aifactory_train.run.checkpoints import TRUST_CONSOLIDATE, verify_deepspeed_checkpoint

    assert verify_deepspeed_checkpoint(str(zero2_run / "checkpoints" / "last.ckpt"), False, TRUST_CONSOLIDATE) == []
    out = tmp_path / "out.ckpt"
    result = aift("checkpoint", "consolidate", str(zero2_run / "checkpoints" / "last.ckpt"), "--out", str(out),
                  cwd=tmp_path)
    assert result.returncode == 0 and "unverified" not in result.stderr, result.stderr[-3000:]
    assert "state_dict" in torch.load(out, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("case", ["junk shard", "no latest", "tag outside", "no optimizer shards"])
def test_consolidate_on_a_folder_that_is_not_a_deepspeed_checkpoint(case, zero2_run, tmp_path):
    """One clear line, no traceback, nothing written, for folders that are not (whole) DeepSpeed checkpoints."""
    folder = Path(shutil.copytree(zero2_run / "checkpoints" / "last.ckpt", tmp_path / "last.ckpt"))
    if case == "junk shard":
        (folder / "checkpoint" / "mp_rank_00_model_states.pt").write_text("not a checkpoint\n")
        expected = "mp_rank_00_model_states.pt' did not pass the weights-only check"
    elif case == "no latest":
        (folder / "latest").unlink()
        expected = "is not a DeepSpeed checkpoint folder: it has no 'latest' file"
    elif case == "tag outside":
        (folder / "latest").write_text("../../elsewhere")
        expected = "its 'latest' file names the tag '../../elsewhere'"
    else:
        for shard in (folder / "checkpoint").glob("*optim_states.pt"):
            shard.unlink()
        expected = "could not be consolidated as a DeepSpeed ZeRO checkpoint"
    out = tmp_path / "out.ckpt"
    result = aift("checkpoint", "consolidate", str(folder), "--out", str(out), cwd=tmp_path)
    assert expected in one_line_error(result)
    assert not list(tmp_path.glob("out.ckpt*"))


def test_resume_refuses_a_shard_that_would_run_code(zero2_run, clinical_data, tmp_path):
    """Resuming a crafted DeepSpeed folder stops before DeepSpeed loads it (the marker never appears, the folder is
    untouched); with checkpoint.trust=true it resumes and the run's MLflow tags say which file was unverified."""
    run = Path(shutil.copytree(zero2_run, tmp_path / "run"))
    marker = tmp_path / "MARKER"
    shard = run / "checkpoints" / "last.ckpt" / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    craft_shard(shard, marker)
    before = {p: p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*") if p.is_file()}
    resume = ["train", *ZERO2, f"data.root={clinical_data}", "trainer.max_epochs=2", "ckpt_path=last",
              f"hydra.run.dir={run}"]
    result = aift(*resume, "tracking=none", cwd=tmp_path)
    error = one_line_error(result)
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in error and "checkpoint.trust=true" in error, error
    assert not marker.exists()
    assert {p: p.stat().st_mtime_ns for p in (run / "checkpoints").rglob("*") if p.is_file()} == before

    result = aift(*resume, "checkpoint.trust=true", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert marker.exists()
    import json

    run_id = json.loads((run / "summary.json").read_text())["mlflow_run_id"]
    tags = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id).data.tags
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in tags["aift.checkpoint.trusted_unverified"]


@pytest.mark.parametrize("command", ["eval", "predict", "export"])
def test_a_checkpoint_of_another_task_is_refused_by_name(command, crop_data, tmp_path):
    """`aift export recipe=crop_detection` with a plastic_sorting checkpoint failed on a key of the detector's
    config ('weed' is not a class of the data); it is now refused as what it is, before anything is built."""
    crafted = tmp_path / "classifier.ckpt"
    torch.save({"hyper_parameters": {"model": {"name": "resnet18", "task": "image_classification"}},
                "callbacks": {"aift_provenance": {"recipe": "plastic_sorting"}}, "state_dict": {}}, crafted)
    extra = {"eval": [f"data.root={crop_data}", "tracking=none"], "predict": [f"input={crop_data / 'images' / 'test'}"],
             "export": ["format=onnx"]}[command]
    result = aift(command, "recipe=crop_detection", f"ckpt_path={crafted}", *extra, "hydra.run.dir=out", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert (f"ckpt_path '{crafted}' holds a model of task image_classification (made by recipe plastic_sorting); "
            "recipe crop_detection needs one of task object_detection") in result.stderr


POINT_BEST = """
import sys, torch
state = torch.load(sys.argv[1], map_location="cpu", weights_only=False)  # a genuine file of this test's own run
(key,) = [k for k in state["callbacks"] if k.startswith("ModelCheckpoint")]
state["callbacks"][key]["best_model_path"] = sys.argv[2]
torch.save(state, sys.argv[1])
"""


def test_the_test_stage_refuses_a_best_folder_the_resumed_state_points_elsewhere(zero2_run, clinical_data, tmp_path):
    """A resumed state that passes the check (plain data) but names another folder as the best checkpoint: the test
    stage after fit would have DeepSpeed unpickle that folder. It must be this run's and pass the same check."""
    import subprocess

    run = Path(shutil.copytree(zero2_run, tmp_path / "run"))
    marker = tmp_path / "MARKER"
    evil = Path(shutil.copytree(run / "checkpoints" / "last.ckpt", tmp_path / "elsewhere" / "best.ckpt"))
    craft_shard(evil / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    states = run / "checkpoints" / "last.ckpt" / "checkpoint" / "mp_rank_00_model_states.pt"
    subprocess.run([sys.executable, "-c", POINT_BEST, str(states), str(evil)], check=True, capture_output=True)
    # the same epochs as the run had: fit has nothing left to do, and goes on to the test stage with "best"
    result = aift("train", *ZERO2, f"data.root={clinical_data}", "run_test=true", "ckpt_path=last",
                  f"hydra.run.dir={run}", "tracking=none", cwd=tmp_path)
    error = one_line_error(result)
    assert str(evil) in error and "not in this run's" in error, error
    assert not marker.exists()
