"""clinical_notes: de-identification, no leaks, SFT with LoRA, eval, HF export, and every bad input named."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import aift

SMOKE = ["debug=smoke", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def read_jsonl_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture
def notes_copy(clinical_data, tmp_path) -> Path:
    """A private copy of the de-identified notes that a test may damage."""
    return Path(shutil.copytree(clinical_data, tmp_path / "notes"))


# -- synthetic data and de-identification ---------------------------------------------------------------
def test_synth_writes_jsonl_splits_marked_not_deidentified(clinical_raw):
    import yaml

    rows = read_jsonl_rows(clinical_raw / "train.jsonl")
    assert len(rows) == 120 and set(rows[0]) == {"note", "summary"}
    assert "BSN" in rows[0]["note"] and rows[0]["summary"]
    assert yaml.safe_load((clinical_raw / "datacard.yaml").read_text())["deidentified"] == "false"


def test_synthetic_bsns_pass_the_eleven_test():
    from random import Random

    from aifactory_train.recipes.clinical_notes.synth import bsn

    rng = Random(3)
    for _ in range(50):
        digits = [int(c) for c in bsn(rng)]
        assert sum(d * w for d, w in zip(digits, [9, 8, 7, 6, 5, 4, 3, 2, -1])) % 11 == 0


def test_deidentify_step_finds_every_planted_identifier(clinical_raw, clinical_data):
    """The CLI's output for the synthetic splits contains none of the names, dates, ages, BSNs, phone numbers,
    addresses and hospitals that synth planted (regenerated here from the same seeds)."""
    from aifactory_train.recipes.clinical_notes.synth import generate_records, split_sizes

    report = json.loads((clinical_data / "deidentification_report.json").read_text())
    for offset, (split, count) in enumerate(split_sizes(120).items()):
        records = generate_records(count, seed=5 * 1000 + offset)
        raw = read_jsonl_rows(clinical_raw / f"{split}.jsonl")
        assert [r["note"] for r in raw] == [r["note"] for r in records]  # same generator, same notes
        clean = read_jsonl_rows(clinical_data / f"{split}.jsonl")
        assert len(clean) == count
        for record, row in zip(records, clean):
            for tag, values in record["planted"].items():
                for value in values:
                    assert value not in row["note"], (split, tag)
            assert "[PERSOON-1]" in row["note"] and "[BSN-1]" in row["note"]
        tags = report["splits"][split]["tags"]
        assert tags["bsn"] == count and tags["persoon"] == 2 * count and tags["telefoonnummer"] == count
    # the report holds counts only, never an original
    text = (clinical_data / "deidentification_report.json").read_text()
    assert records[0]["planted"]["bsn"][0] not in text


def test_deidentify_cli_writes_marked_copy_and_refuses_a_non_empty_out(clinical_raw, tmp_path):
    result = aift("data", "deidentify", "recipe=clinical_notes", f"data.root={clinical_raw}", "--out", "clean",
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "aift train recipe=clinical_notes data.root=clean" in result.stdout
    assert "deidentified: 'true'" in (tmp_path / "clean" / "datacard.yaml").read_text()
    before = (tmp_path / "clean" / "train.jsonl").read_bytes()
    again = aift("data", "deidentify", "recipe=clinical_notes", f"data.root={clinical_raw}", "--out", "clean",
                 cwd=tmp_path)
    assert again.returncode == 2 and "not empty" in again.stderr and "--overwrite" in again.stderr
    assert (tmp_path / "clean" / "train.jsonl").read_bytes() == before


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _has_open(pid: int, path: Path) -> bool:
    try:
        return any(os.readlink(fd) == str(path) for fd in Path(f"/proc/{pid}/fd").iterdir())
    except OSError:  # an fd closed while we looked, or the process ended
        return False


def test_deduce_is_loaded_by_one_process_at_a_time():
    """deduce's first start on an install pickles its lookup tables into its package folder, not atomically; a second
    process loading meanwhile read half a file (UnpicklingError; seen with two test workers on a fresh install).
    While another process holds the lock, a Deidentifier waits, idle, and then loads and works."""
    from aifactory_train.recipes.clinical_notes.deidentify import deduce_cache_lock

    script = ("from aifactory_train.recipes.clinical_notes.deidentify import Deidentifier; "
              "print(Deidentifier()('Jan Jansen, BSN 111222333, belde op 12 maart 2024.'))")
    with deduce_cache_lock() as lock_file:
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 600
        while not _has_open(child.pid, lock_file) and child.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert _has_open(child.pid, lock_file), f"the loader never took the lock file {lock_file}"
        before = _cpu_ticks(child.pid)
        time.sleep(1.0)
        assert child.poll() is None and _cpu_ticks(child.pid) - before <= 5  # waiting, not loading
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err[-2000:]
    assert "Jan Jansen" not in out and "111222333" not in out and "[PERSOON-1]" in out


def test_deidentify_for_a_recipe_without_it_is_refused(plastic_data, tmp_path):
    result = aift("data", "deidentify", "recipe=plastic_sorting", f"data.root={plastic_data}", "--out", "x", cwd=tmp_path)
    assert result.returncode == 2 and "no de-identification step" in result.stderr
    assert not (tmp_path / "x").exists()


def test_raw_notes_are_refused_unless_deidentified_inline(clinical_raw, tmp_path):
    result = aift("train", "recipe=clinical_notes", f"data.root={clinical_raw}", *SMOKE, cwd=tmp_path)
    assert result.returncode == 2
    assert "not marked de-identified" in result.stderr and "aift data deidentify" in result.stderr
    assert "data.deidentify=inline" in result.stderr
    assert not list(tmp_path.glob("outputs/*/*/checkpoints/*.ckpt"))
    assert not (tmp_path / "mlflow.db").exists()  # refused before any run is recorded
    # nor is a Slurm job queued for them (checked before sbatch is even looked up)
    result = aift("launch", "recipe=clinical_notes", f"data.root={clinical_raw}", "cluster=local_slurm",
                  "trainer.accelerator=cpu", cwd=tmp_path, env={"PATH": str(tmp_path / "no-such-bin")})
    assert result.returncode == 2 and "not marked de-identified" in result.stderr, result.stderr[-2000:]


# -- no leaks -----------------------------------------------------------------------------------------------
CANARY_NOTE = ("Mevr. Geertruida Kanariehof, geboren 29-02-1952 (72 jaar), BSN 111222333. Adres: Vogelzangsteeg 77, "
               "9999 ZZ Warffum. Telefoon 06-98765432. Op 14 juli 2024 gezien op de polikliniek neurologie van het "
               "UMCG door dr. Q. Xylofoonhuis. Patient meldt hoofdpijn sinds 3 dagen. Bij lichamelijk onderzoek een "
               "normale auscultatie. Beleid: start paracetamol 500 mg, controle over 2 weken.")
CANARY_SUMMARY = "Hoofdpijn sinds 3 dagen bij mevr. Kanariehof (tel. 06-98765432), gezien bij neurologie."
CANARIES = ["Kanariehof", "Geertruida", "Xylofoonhuis", "111222333", "98765432", "Vogelzangsteeg", "29-02-1952",
            "9999 ZZ"]


def files_containing_canaries(folders: list[Path]) -> dict[str, list[str]]:
    found = {}
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                hits = [c for c in CANARIES if c.encode() in data]
                if hits:
                    found[str(path)] = hits
    return found


@pytest.fixture
def canary_raw(clinical_raw, tmp_path) -> Path:
    """The raw notes with canary identifiers planted in every split."""
    raw = Path(shutil.copytree(clinical_raw, tmp_path / "raw"))
    for split in ("train", "val", "test"):
        rows = read_jsonl_rows(raw / f"{split}.jsonl")
        # a note of its own per split: the reader refuses a note that is in two splits (leakage)
        rows[1] = {"note": f"{CANARY_NOTE} ({split})", "summary": CANARY_SUMMARY}
        write_jsonl(raw / f"{split}.jsonl", rows * (2 if split == "train" else 1))
    return raw


def test_no_canary_leaves_the_run(canary_raw, tmp_path):
    """Plant identifiers, then de-identify, train (LoRA, checkpoints logged to MLflow), evaluate and export, also
    once with inline de-identification; search every file written (run folders, MLflow store and artifacts,
    checkpoints, tokenizer, exported model, de-identified data, HF cache): no canary anywhere."""
    work = tmp_path / "work"
    work.mkdir()
    env = {"HF_HOME": str(tmp_path / "hf_home"), "HF_DATASETS_CACHE": str(tmp_path / "hf_home" / "datasets")}
    # the search works: it finds every canary in the raw data
    assert set(sum(files_containing_canaries([canary_raw]).values(), [])) == set(CANARIES)

    steps = [
        ["data", "deidentify", "recipe=clinical_notes", f"data.root={canary_raw}", "--out", "clean"],
        ["train", "recipe=clinical_notes", "data.root=clean", "model.finetune=lora", "tracking.log_checkpoints=true",
         "hydra.run.dir=outputs/run", *SMOKE],
        ["eval", "recipe=clinical_notes", "data.root=clean", "ckpt_path=outputs/run/checkpoints/last.ckpt",
         "hydra.run.dir=outputs/eval", "trainer.limit_test_batches=1"],
        ["export", "recipe=clinical_notes", "ckpt_path=outputs/run/checkpoints/last.ckpt", "format=hf",
         "hydra.run.dir=outputs/export"],
        # raw notes (their card does not say deidentified: true): under profile=secure only (recipe.secure_unless_card)
        ["train", "recipe=clinical_notes", f"data.root={canary_raw}", "data.deidentify=inline", "profile=secure",
         "hydra.run.dir=outputs/inline", *SMOKE],
        # summaries of the raw test notes: de-identified inline before the model reads them
        ["predict", "recipe=clinical_notes", "ckpt_path=outputs/run/checkpoints/last.ckpt",
         f"input={canary_raw / 'test.jsonl'}", "data.deidentify=inline", "hydra.run.dir=outputs/predict"],
    ]
    logs = []
    for step in steps:
        result = aift(*step, cwd=work, env=env)
        assert result.returncode == 0, (step, result.stderr[-3000:])
        logs.append(result.stdout + result.stderr)
    assert (work / "outputs/run/tokenizer/tokenizer.json").is_file()
    assert (work / "outputs/export/model/model.safetensors").is_file()
    assert list((work / "mlruns").rglob("*.ckpt")), "checkpoints were to be logged as MLflow artifacts"
    assert (work / "mlflow.db").is_file()
    assert len((work / "outputs/predict/predictions.jsonl").read_text().splitlines()) == 18
    leaks = files_containing_canaries([work, tmp_path / "hf_home"] if (tmp_path / "hf_home").exists() else [work])
    assert leaks == {}
    assert not [c for c in CANARIES for log in logs if c in log]
    # generated samples are off by default: no sample file anywhere
    assert not list(work.rglob("samples_*.jsonl"))


# -- training, tracking, eval, export -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_run(clinical_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("clinical_run")
    result = aift("train", "recipe=clinical_notes", f"data.root={clinical_data}", "model.finetune=lora",
                  "trainer.max_epochs=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
                  "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=2", "hydra.run.dir=outputs/run",
                  cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return work, json.loads((work / "outputs/run/summary.json").read_text())


def test_lora_run_logs_loss_perplexity_rouge_and_tokens_to_mlflow(lora_run):
    work, summary = lora_run
    assert summary["recipe"] == "clinical_notes" and summary["task"] == "causal_lm"
    assert summary["train_tokens"] > summary["train_samples"] > 0 and summary["train_tokens_per_s"] > 0
    assert summary["train_flops_per_token"] > 0
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    for key in ("train/loss", "val/loss", "val/perplexity", "val/rougeL", "test/rougeL", "throughput/device/tokens_per_sec"):
        assert key in run.data.metrics, key
    assert 0 <= run.data.metrics["val/rougeL"] <= 1
    assert run.data.params["model/finetune"] == "lora"
    assert run.data.tags["aift.data.deidentified"] == "true"
    history = [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert history[-1] < history[0]  # LoRA adapters do train
    # only the adapters train with LoRA
    ckpt = torch.load(summary["last_checkpoint"], map_location="cpu", weights_only=True)
    assert any("lora_A" in k for k in ckpt["state_dict"]) and "aift_tokenizer" in ckpt


def test_eval_needs_only_the_split_it_scores(lora_run, clinical_data, tmp_path):
    # an evaluation set delivered on its own: no train.jsonl beside it
    _, summary = lora_run
    data = tmp_path / "eval_only"
    data.mkdir()
    for name in ("val.jsonl", "test.jsonl", "datacard.yaml"):
        shutil.copy(clinical_data / name, data / name)
    args = ["eval", "recipe=clinical_notes", f"data.root={data}", f"ckpt_path={summary['last_checkpoint']}",
            "tracking=none", "trainer.limit_test_batches=1"]
    result = aift(*args, f"hydra.run.dir={tmp_path}/eval", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/loss" in json.loads((tmp_path / "eval" / "eval.json").read_text())["metrics"]
    (data / "test.jsonl").unlink()
    result = aift(*args, f"hydra.run.dir={tmp_path}/eval2", cwd=tmp_path)
    assert result.returncode == 2 and "data.splits.test" in result.stderr and "test.jsonl" in result.stderr


def test_eval_scores_the_checkpoint_with_its_own_tokenizer(lora_run, clinical_data):
    work, summary = lora_run
    result = aift("eval", "recipe=clinical_notes", f"data.root={clinical_data}", f"ckpt_path={summary['last_checkpoint']}",
                  "split=val", "trainer.limit_val_batches=1", "hydra.run.dir=outputs/eval", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((work / "outputs/eval/eval.json").read_text())
    assert {"val/loss", "val/perplexity", "val/rougeL"} <= set(report["metrics"])
    assert report["trained_mlflow_run_id"] == summary["mlflow_run_id"]
    assert not (work / "outputs/eval/tokenizer").exists()  # no tokenizer was trained for eval


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "adapter"])
def test_hf_export_loads_with_from_pretrained_and_generates_like_the_module(lora_run, merge):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aifactory_train.recipes.clinical_notes.module import ClinicalNotesModule

    work, summary = lora_run
    out = f"outputs/export_{merge}"
    register = ["export.register=note-summariser"] if merge else []  # the HF folder, whole, as a registered version
    result = aift("export", "recipe=clinical_notes", f"ckpt_path={summary['last_checkpoint']}", "format=hf",
                  f"export.merge_lora={str(merge).lower()}", *register, f"hydra.run.dir={out}", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = work / out / "model"
    if merge:
        registered = json.loads((work / out / "export.json").read_text())["registered"]
        client = MlflowClient(tracking_uri=registered["tracking_uri"])
        version = client.get_model_version("note-summariser", str(registered["version"]))
        assert version.tags["aift.data.digest"] == summary["dataset"]["digest"]
        logged = registered["source"].rsplit("/artifacts/", 1)[1]
        names = {a.path.rsplit("/", 1)[1] for a in client.list_artifacts(summary["mlflow_run_id"], f"{logged}/model")}
        assert {"model.safetensors", "tokenizer.json", "provenance.json"} <= names
    assert (folder / ("model.safetensors" if merge else "adapter_model.safetensors")).is_file()
    # checked before release: the written folder, loaded by transformers (peft), gives the checkpoint's logits, and
    # the de-identified notes' model passes the disclosure check (figures: tests/test_clinical_notes.py, below)
    report = json.loads((work / out / "export.json").read_text())
    assert report["released"] and report["parity"]["passed"] and report["parity"]["max_abs_diff"] < 1e-3
    assert report["parity"]["inputs"] == {"split": "test", "records": 4}
    tests = report["disclosure"]["tests"]
    assert report["disclosure"]["passed"] and tests["membership_inference"]["auc"] <= 0.75
    assert tests["verbatim_memorisation"]["gap"] <= 0.2 and tests["vocabulary"]["rare_entries"] == 0
    assert "disclosure check passed: membership AUC" in result.stdout
    # the folder carries its provenance: a hospital receiving only it can tell which notes trained it
    record = json.loads((folder / "provenance.json").read_text())
    assert record == json.loads((work / out / "provenance.json").read_text())
    assert record["export"]["checks"]["released"] and record["export"]["checks"]["disclosure"] == report["disclosure"]
    assert record["datasets"] == [summary["dataset"]] and record["datasets"][0]["datacard"]["deidentified"] == "true"
    assert record["runs"][-1]["mlflow_run_id"] == summary["mlflow_run_id"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    module = ClinicalNotesModule.load_from_checkpoint(summary["last_checkpoint"], map_location="cpu",
                                                      weights_only=True).eval()
    prompt = json.loads((folder / "aift_prompt.json").read_text())["prompt_template"].format(
        text="[PERSOON-1], geboren [DATUM-1]. Patient meldt hoofdpijn sinds 3 dagen.")
    ids = tokenizer(prompt, return_tensors="pt")
    assert ids.input_ids[0, 0].item() == tokenizer.bos_token_id
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, module.net(**ids).logits, atol=1e-4, rtol=1e-4)
        ours = module.net.generate(**ids, max_new_tokens=12, do_sample=False)
    theirs = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(ours, theirs)


@pytest.fixture(scope="module")
def summariser(clinical_data, tmp_path_factory):
    """A full fine-tune long enough to write summaries of the notes it reads (val ROUGE-L ~0.7 after 12 epochs
    on the 120 notes, ~30 s on one core), where the LoRA smoke run's are still one repeated token."""
    work = tmp_path_factory.mktemp("summariser")
    result = aift("train", "recipe=clinical_notes", f"data.root={clinical_data}", "trainer.max_epochs=12",
                  "run_test=false", "tracking=none", "trainer.enable_progress_bar=false", "hydra.run.dir=outputs/run",
                  cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return work, json.loads((work / "outputs/run/summary.json").read_text())


def test_predictions_are_the_summaries_of_the_eval_data_path(summariser, clinical_data):
    """aift predict on the test notes (their summaries are not read) gives, line by line, the greedy summary the
    module generates for the test split as aift eval loads it (its DataModule, prompts and left padding), and
    those summaries are drafts of these notes: ROUGE-L against the written summaries well above a bad model's."""
    from torchmetrics.text import ROUGEScore

    from aifactory_train.run.checkpoints import load_trained_module
    from aifactory_train.recipes.clinical_notes.data import ClinicalNotesDataModule
    from aifactory_train.recipes.clinical_notes.module import ClinicalNotesModule, normalize_for_rouge

    work, summary = summariser
    notes = clinical_data / "test.jsonl"
    result = aift("predict", "recipe=clinical_notes", f"ckpt_path={summary['last_checkpoint']}", f"input={notes}",
                  "predict.batch_size=8", "hydra.run.dir=outputs/predict", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_jsonl_rows(work / "outputs/predict/predictions.jsonl")
    assert [(r["file"], r["line"]) for r in rows] == [(str(notes), n) for n in range(1, 19)]
    assert all(set(r) == {"file", "line", "summary", "note_truncated"} for r in rows)  # never the note itself

    module = load_trained_module(ClinicalNotesModule, summary["last_checkpoint"]).eval()
    data = ClinicalNotesDataModule(str(clinical_data), splits={"test": "test.jsonl"}, batch_size=8)
    data.adopt_checkpoint(summary["last_checkpoint"])
    data.setup("test")
    module.tokenizer = data.tokenizer
    expected = []
    with torch.inference_mode():
        for batch in data.test_dataloader():
            expected += module.generate(batch["prompt_ids"], batch["prompt_mask"])
    assert [r["summary"] for r in rows] == expected
    references = [r["summary"] for r in read_jsonl_rows(notes)]
    rouge = ROUGEScore(rouge_keys="rougeL", normalizer=normalize_for_rouge)
    assert rouge(expected, references)["rougeL_fmeasure"] > 0.5
    assert len(set(expected)) > 9  # each note its own summary
    report = json.loads((work / "outputs/predict/predict.json").read_text())
    assert (report["files"], report["rows"]) == (1, 18) and report["trained_on"] == [summary["dataset"]]
    assert report["input_datacard"]["deidentified"] == "true"
    assert report["options"]["text_field"] == "note" and report["options"]["deidentify"] == "none"
    assert "predicted 1 file(s), 18 row(s)" in result.stdout


@pytest.mark.parametrize("case", ["not de-identified", "no card", "another field", "empty file", "bad mode"])
def test_predict_refuses_notes_it_may_not_or_cannot_read(case, lora_run, clinical_raw, clinical_data, tmp_path):
    _, summary = lora_run
    folder = tmp_path / "notes"
    folder.mkdir()
    notes = folder / "ward3.jsonl"
    shutil.copy(clinical_data / "test.jsonl", notes)
    shutil.copy(clinical_data / "datacard.yaml", folder / "datacard.yaml")
    extra = []
    if case == "not de-identified":  # the raw notes with their own card, which says deidentified: false
        shutil.copy(clinical_raw / "test.jsonl", notes)
        shutil.copy(clinical_raw / "datacard.yaml", folder / "datacard.yaml")
        message = (f"input '{notes}' is not marked de-identified (its data card '{folder / 'datacard.yaml'}' has "
                   f"deidentified: false); the model reads de-identified notes only. Add data.deidentify=inline")
    elif case == "no card":
        (folder / "datacard.yaml").unlink()
        message = f"input '{notes}' is not marked de-identified (no datacard.yaml at or above it says so)"
    elif case == "another field":
        extra = ["data.text_field=body"]
        message = f"{notes} line 1: the record has no field 'body' (data.text_field); its fields are ['note', 'summary']"
    elif case == "empty file":
        notes.write_text("\n")
        message = f"input '{notes}' has no records; each line must be one JSON object with a 'note' field"
    else:
        extra = ["data.deidentify=later"]
        message = ("config key 'predict.deidentify': 'later' is not valid; expected none or inline (it follows "
                   "data.deidentify unless set)")
    result = aift("predict", "recipe=clinical_notes", f"ckpt_path={summary['last_checkpoint']}", f"input={notes}",
                  *extra, "hydra.run.dir=out", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr, result.stderr[-2000:]
    assert not list((tmp_path / "out").glob("predictions.jsonl*")) and not (tmp_path / "out" / "predict.json").exists()


def test_resume_uses_the_checkpoint_tokenizer_and_continues(lora_run, clinical_data, tmp_path):
    work, summary = lora_run
    run = Path(shutil.copytree(work / "outputs/run", tmp_path / "run"))
    (run / "tokenizer").rename(run / "tokenizer_moved")  # resume must not depend on the folder copy
    result = aift("train", "recipe=clinical_notes", f"data.root={clinical_data}", "model.finetune=lora",
                  "ckpt_path=last", f"hydra.run.dir={run}", "trainer.max_epochs=3", "trainer.limit_val_batches=1",
                  "trainer.limit_test_batches=1", "tracking=none", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["global_step"] > summary["global_step"]
    assert (run / "tokenizer/tokenizer.json").read_text() == (run / "tokenizer_moved/tokenizer.json").read_text()


def test_pretrained_local_model_fine_tunes_with_lora(pretrained_lm, clinical_data, tmp_path):
    result = aift("train", "recipe=clinical_notes", "model=hf_local", f"model.pretrained_path={pretrained_lm}",
                  f"data.root={clinical_data}", *SMOKE, "tracking=none", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # its own tokenizer, not one trained on the data
    saved = json.loads((tmp_path / "run/tokenizer/tokenizer.json").read_text())
    assert saved["model"]["vocab"] == json.loads((pretrained_lm / "tokenizer.json").read_text())["model"]["vocab"]


# -- prompts, labels, packing, truncation -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(clinical_data):
    from aifactory_train.recipes.clinical_notes.data import read_jsonl, train_tokenizer

    records = read_jsonl(clinical_data / "train.jsonl", "train", "note", "summary")
    return train_tokenizer([t for _, note, summary in records for t in (note, summary)], 600)


def test_loss_is_only_on_the_summary_tokens(tokenizer):
    from aifactory_train.recipes.clinical_notes.data import PromptEncoder

    encoder = PromptEncoder(tokenizer, "Notitie:\n{text}\n\nSamenvatting:\n", max_length=128, max_target_length=40)
    example = encoder.encode("Patient meldt hoofdpijn sinds 3 dagen.", "Hoofdpijn sinds 3 dagen.")
    scored = [label for label in example["labels"] if label != -100]
    assert scored == tokenizer("Hoofdpijn sinds 3 dagen.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt_len = len(example["input_ids"]) - len(scored)
    assert example["labels"][:prompt_len] == [-100] * prompt_len
    assert example["input_ids"][0] == tokenizer.bos_token_id
    assert example["prompt_ids"] == example["input_ids"][:prompt_len]


def test_long_note_is_truncated_and_counted_not_dropped(notes_copy, tmp_path):
    rows = read_jsonl_rows(notes_copy / "train.jsonl")
    rows[0]["note"] = rows[0]["note"] + " Aanvullend:" + " hoofdpijn en duizeligheid" * 300
    write_jsonl(notes_copy / "train.jsonl", rows)
    result = aift("train", "recipe=clinical_notes", f"data.root={notes_copy}", *SMOKE, "tracking=none",
                  "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    dataset = json.loads((tmp_path / "run/summary.json").read_text())["dataset"]
    assert dataset["datacard"]["note_truncated_train"] == "1"
    assert dataset["splits"]["train"]["num_rows"] == len(rows)
    assert "1 of 120 notes were longer than data.max_length" in result.stdout + result.stderr


def test_packed_rows_give_the_same_logits_as_separate_examples(tokenizer):
    """Packing keeps attention inside each example (transformers reads the restarting position ids)."""
    from transformers import AutoModelForCausalLM

    from aifactory_train.recipes.clinical_notes.data import Collator, PromptEncoder, pack_rows
    from aifactory_train.recipes.clinical_notes.model import llama_config

    encoder = PromptEncoder(tokenizer, "Notitie:\n{text}\n\nSamenvatting:\n", max_length=128, max_target_length=40)
    examples = [encoder.encode(f"Patient meldt hoofdpijn sinds {n} dagen.", f"Hoofdpijn sinds {n} dagen.")
                for n in (2, 3, 4)]
    rows = pack_rows(examples, max_length=128)
    assert len(rows) == 1 and len(rows[0]["input_ids"]) == sum(len(e["input_ids"]) for e in examples)
    info = {"vocab_size": len(tokenizer), "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": None,
             "max_position_embeddings": 256, "vocab_size": None}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama_config(sizes, info), attn_implementation="sdpa").eval()
    batch = Collator(pad_id=0, generation=False)(rows)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        start = 0
        for example in examples:
            alone = model(input_ids=torch.tensor([example["input_ids"]])).logits[0]
            torch.testing.assert_close(packed[start:start + len(alone)], alone, atol=1e-5, rtol=1e-4)
            start += len(alone)
        # and the module's own forward (the training loss) on the packed row: the token-weighted mean of the
        # examples' losses on their own
        from types import SimpleNamespace

        from aifactory_train.recipes.clinical_notes.module import ClinicalNotesModule

        packed_loss = ClinicalNotesModule.forward(SimpleNamespace(net=model.train()), batch)
        separate = Collator(pad_id=0, generation=False)
        losses, weights = [], []
        for example in examples:
            single = separate([{"input_ids": example["input_ids"], "labels": example["labels"]}])
            losses.append(ClinicalNotesModule.forward(SimpleNamespace(net=model), single))
            weights.append(sum(label != -100 for label in example["labels"]))
        expected = sum(l * w for l, w in zip(losses, weights)) / sum(weights)
        torch.testing.assert_close(packed_loss, expected, atol=1e-5, rtol=1e-4)


def test_packing_and_gradient_checkpointing_train_end_to_end(clinical_data, tmp_path):
    result = aift("train", "recipe=clinical_notes", f"data.root={clinical_data}", "data.packing=true", "data.max_length=512",
                  "model.gradient_checkpointing=true",
                  *SMOKE, "tracking=none", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["train_tokens"] / summary["train_samples"] > 300  # rows hold several ~145-token examples


# -- bad input ----------------------------------------------------------------------------------------------
def test_record_missing_the_configured_field_names_file_and_line(notes_copy, tmp_path):
    rows = read_jsonl_rows(notes_copy / "train.jsonl")
    rows[6] = {"note": rows[6]["note"], "samenvatting": rows[6]["summary"]}
    write_jsonl(notes_copy / "train.jsonl", rows)
    result = aift("train", "recipe=clinical_notes", f"data.root={notes_copy}", *SMOKE, "tracking=none", cwd=tmp_path)
    assert result.returncode == 2
    assert "train.jsonl line 7" in result.stderr and "'summary' (data.target_field)" in result.stderr
    assert "samenvatting" in result.stderr  # the fields it does have, so the user can fix the config
    assert rows[6]["note"][:30] not in result.stderr  # never the text


@pytest.mark.parametrize("field", ["note", "summary"])
def test_empty_note_or_summary_is_refused_with_its_line(notes_copy, tmp_path, field):
    rows = read_jsonl_rows(notes_copy / "val.jsonl")
    rows[2][field] = "  "
    write_jsonl(notes_copy / "val.jsonl", rows)
    result = aift("train", "recipe=clinical_notes", f"data.root={notes_copy}", *SMOKE, "tracking=none", cwd=tmp_path)
    assert result.returncode == 2
    assert f"val.jsonl line 3: field '{field}'" in result.stderr and "is empty" in result.stderr


def test_pretrained_path_that_does_not_exist(clinical_data, tmp_path):
    result = aift("train", "recipe=clinical_notes", "model=hf_local", "model.pretrained_path=/nowhere/lm",
                  f"data.root={clinical_data}", *SMOKE, "tracking=none", cwd=tmp_path)
    assert result.returncode == 2
    assert "model.pretrained_path" in result.stderr and "/nowhere/lm" in result.stderr
    assert "nothing is downloaded" in result.stderr


def test_pretrained_folder_whose_tokenizer_outgrows_the_model_vocab(pretrained_lm, clinical_data, tmp_path):
    folder = Path(shutil.copytree(pretrained_lm, tmp_path / "lm"))
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = 100
    (folder / "config.json").write_text(json.dumps(config))
    result = aift("train", "recipe=clinical_notes", "model=hf_local", f"model.pretrained_path={folder}",
                  f"data.root={clinical_data}", *SMOKE, "tracking=none", cwd=tmp_path)
    assert result.returncode == 2
    assert "the tokenizer has 512 tokens but the model's vocab_size (config.json) is 100" in result.stderr


def test_lora_target_modules_not_in_the_model_list_the_available_ones(clinical_data, tmp_path):
    result = aift("train", "recipe=clinical_notes", "model.finetune=lora", "model.lora.target_modules=[qkv_proj]",
                  f"data.root={clinical_data}", *SMOKE, "tracking=none", cwd=tmp_path)
    assert result.returncode == 2
    assert "model.lora.target_modules" in result.stderr and "qkv_proj" in result.stderr
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in result.stderr


def test_prompt_template_without_placeholder_is_refused(clinical_data, tmp_path):
    result = aift("train", "recipe=clinical_notes", "data.prompt_template=Samenvatting", f"data.root={clinical_data}",
                  "tracking=none", cwd=tmp_path)
    assert result.returncode == 2 and "data.prompt_template" in result.stderr and "{text}" in result.stderr


# -- output checks before a model leaves (aift export; aifactory_train/run/release.py) ------------------------
@pytest.mark.e2e
def test_export_of_a_model_that_memorised_its_notes_is_refused(notes_copy):
    """A model trained 40 epochs on 8 notes (train loss ~0) fails the disclosure check: nothing is kept or
    registered, the reports say why. (A normally trained one passes: test_hf_export_loads_... above.)"""
    rows = read_jsonl_rows(notes_copy / "train.jsonl")
    write_jsonl(notes_copy / "train.jsonl", rows[:8])
    work = notes_copy.parent
    result = aift("train", "recipe=clinical_notes", f"data.root={notes_copy}", "trainer.max_epochs=40",
                  "run_test=false", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
                  "hydra.run.dir=outputs/overfit", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    result = aift("export", "recipe=clinical_notes", "ckpt_path=outputs/overfit/checkpoints/last.ckpt", "format=hf",
                  "export.register=never-registered", "hydra.run.dir=outputs/export", cwd=work)
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "disclosure check failed for sensitive data" in line and "deidentified: true" in line
    assert "membership-inference AUC" in line and "verbatim gap" in line and "not released" in line
    report = json.loads((work / "outputs/export/export.json").read_text())
    tests = report["disclosure"]["tests"]
    assert not report["released"] and "registered" not in report and report["parity"]["passed"]
    assert tests["membership_inference"]["auc"] > 0.75 and tests["membership_inference"]["train_records"] == 8
    assert tests["verbatim_memorisation"]["gap"] > 0.2
    assert not (work / "outputs/export/model").exists()  # no model file stays behind
    assert json.loads((work / "outputs/export/provenance.json").read_text())["export"]["checks"]["released"] is False
    summary = json.loads((work / "outputs/overfit/summary.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    assert client.search_registered_models(filter_string="name='never-registered'") == []
    # nor does the training run say its model went anywhere (aift data runs reads these tags)
    assert not [k for k in client.get_run(summary["mlflow_run_id"]).data.tags if k.startswith("aift.export.")]


def test_a_string_deidentification_missed_is_caught_in_the_tokenizer_vocabulary(clinical_data):
    """deduce does not know a family's nickname; repeated in one note, BPE makes it a vocabulary entry that would
    travel with the exported model. The vocabulary test names one entry that occurs in fewer than 2 records."""
    from aifactory_train.recipes.clinical_notes.data import read_jsonl, train_tokenizer
    from aifactory_train.recipes.clinical_notes.deidentify import Deidentifier
    from aifactory_train.run.release import rare_vocabulary

    records = read_jsonl(clinical_data / "train.jsonl", "train", "note", "summary")
    texts = [f"{note}\n{summary}" for _, note, summary in records]
    planted = "Zwibbeltje"
    note = " ".join([f"Moeder noemt hem {planted.lower()}, {planted.lower()} slaapt slecht."] * 12)
    assert planted.lower() in Deidentifier()(note)  # de-identification leaves it in
    clean = train_tokenizer([t for _, n, s in records for t in (n, s)], 1024)  # data.tokenizer_vocab_size
    leaky = train_tokenizer([t for _, n, s in records for t in (n, s)] + [note], 1024)

    def entries(tokenizer):
        return [tokenizer.decode([i]) for i in range(len(tokenizer)) if i not in set(tokenizer.all_special_ids)]

    assert rare_vocabulary(entries(clean), texts, 2, 4) == []
    rare = rare_vocabulary(entries(leaky), [*texts, note], 2, 4)
    assert rare and all(r["records"] == 1 for r in rare)
    assert " zwibbeltje" in [r["entry"] for r in rare]

