"""Consent as codes (a data card's GA4GH DUO codes, checked against the purpose a run declares, ``run.purpose``)
and the audit log (one hash-chained JSON line per action, refused ones included; `aift audit verify`)."""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import pwd
import shutil
from pathlib import Path

import pytest
import yaml

from aifactory_train.errors import ConfigError, DataError
from aifactory_train.records.usage_terms import DATACARD_FILE, check_usage, usage_tags
from conftest import aift

OS_USER = pwd.getpwuid(os.getuid()).pw_name
PLASTIC = {"name": "plastic_sorting", "module": {"_target_": "aifactory_train.recipes.plastic_sorting.module.M"}}
TODAY = datetime.date(2026, 11, 30)


def coded(folder: Path, duo, **card) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DATACARD_FILE).write_text(yaml.safe_dump({"owner": "UMCG", **card, "duo": duo}))
    return folder


def run(**purpose) -> dict:
    return {"run": {"purpose": purpose}, "audit": {"path": None}}


RESEARCH = {"use": "research", "organisation": "academic", "area": "health", "ethics_approval": "METc 2026/123"}


def test_a_commercial_company_run_on_non_commercial_data_is_refused_naming_the_code_and_card(tmp_path):
    data = coded(tmp_path / "cohort", ["DUO:0000042", "DUO:0000046"])
    with pytest.raises(DataError) as refused:
        check_usage(data, PLASTIC, config=run(use="commercial", organisation="company"), today=TODAY)
    message = str(refused.value)
    assert f"data card '{data / DATACARD_FILE}' does not permit this use" in message
    assert "DUO:0000046 (non-commercial use only): non-commercial use only, and run.purpose.use is 'commercial'" \
        in message
    assert "DUO:0000042 (general research use)" in message  # every code the purpose breaks, in one line
    # not-for-profit organisations only: a company's research is refused, an academic one is not
    npu = coded(tmp_path / "npu", ["DUO:0000042", "DUO:0000045"])
    with pytest.raises(DataError, match=r"DUO:0000045 \(not for profit organisation use only\).*'company'"):
        check_usage(npu, PLASTIC, config=run(use="research", organisation="company"), today=TODAY)
    check_usage(npu, PLASTIC, config=run(use="research", organisation="government"), today=TODAY)


def test_a_research_purpose_is_accepted_and_the_codes_and_purpose_are_recorded(tmp_path):
    data = coded(tmp_path / "cohort", ["DUO:0000006", "DUO:0000046", "DUO:0000021",
                                       {"code": "DUO:0000028", "institutions": ["UMCG", "RUG"]},
                                       {"code": "DUO:0000026", "users": [OS_USER]},
                                       {"code": "DUO:0000025", "until": "2027-06-30"}, "DUO:0000029"])
    record = check_usage(data, PLASTIC, config=run(**RESEARCH, institution="RUG"), today=TODAY)
    assert record["purpose"]["use"] == "research" and record["purpose"]["ethics_approval"] == "METc 2026/123"
    assert [c["id"] for c in record["consent_codes"][0]["codes"]][:3] == ["DUO:0000006", "DUO:0000046", "DUO:0000021"]
    assert record["obligations"] and record["obligations"][0].startswith("DUO:0000029 (RTN")  # not checkable: kept
    tags = usage_tags(record)
    assert tags["aift.usage.duo"].startswith("DUO:0000006 DUO:0000046 DUO:0000021 DUO:0000028")
    assert "use=research" in tags["aift.usage.purpose"] and "institution=RUG" in tags["aift.usage.purpose"]
    # ... and each parameterised code restricts
    refusals = [(run(**RESEARCH, institution="Acme"), "institutions UMCG, RUG only, and run.purpose.institution is "
                                                      "'Acme'", TODAY),
                (run(**RESEARCH, institution="RUG"), "use until 2027-06-30 only, and today is 2027-07-01",
                 datetime.date(2027, 7, 1)),
                (run(**{**RESEARCH, "area": "other"}, institution="RUG"), "health/medical/biomedical research only",
                 TODAY)]
    for config, message, today in refusals:
        with pytest.raises(DataError) as refused:
            check_usage(data, PLASTIC, config=config, today=today)
        assert message in str(refused.value)


def test_the_codes_a_derived_dataset_carries_from_its_source_apply(tmp_path):
    source_card = {"owner": "UMCG", "duo": ["DUO:0000042", "DUO:0000046"]}
    derived = tmp_path / "clean"
    derived.mkdir()
    (derived / DATACARD_FILE).write_text(yaml.safe_dump({"owner": "UMCG", "derived_from": {
        "source": "/raw", "digest": "x", "cards": [{"path": "/raw/datacard.yaml", "card": source_card}]}}))
    with pytest.raises(DataError, match=r"derived_from '/raw/datacard.yaml' does not permit this use: .*DUO:0000046"):
        check_usage(derived, PLASTIC, config=run(use="commercial", organisation="company"), today=TODAY)


@pytest.mark.parametrize("duo, message", [
    (["DUO:0000042", "DUO:0000999"], "duo[1]: 'DUO:0000999' is not a DUO code aift knows"),
    (["DUO:0000001"], "duo[0]: DUO:0000001 (data use permission) is DUO's category, not a code to state"),
    (["DUO:0000007"], "duo[0] DUO:0000007 (disease specific research) needs 'disease'"),
    ([{"code": "DUO:0000007", "disease": ["diabetes"]}],
     "duo[0] DUO:0000007.disease: 'diabetes' is not a disease ontology id"),
    (["DUO:0000046"], "duo states 0 data use permissions (none); a card states exactly one of"),
    (["DUO:0000042", "DUO:0000004"], "duo states 2 data use permissions (DUO:0000042, DUO:0000004)"),
    ([{"code": "DUO:0000025", "until": "soon"}], "duo[0] DUO:0000025.until must be a date (YYYY-MM-DD), not 'soon'"),
    ([{"code": "DUO:0000042", "users": ["a"]}], "duo[0] DUO:0000042 (general research use) has unknown parameter(s) "
                                                "['users']; valid: none"),
    ("DUO:0000042", "duo must be a non-empty list of DUO codes"),
])
def test_a_card_whose_codes_cannot_be_read_is_refused_in_one_line(tmp_path, duo, message):
    data = coded(tmp_path / "d", duo)
    with pytest.raises(DataError) as refused:
        check_usage(data, PLASTIC, config=run(**RESEARCH), today=TODAY)
    assert f"data card '{data / DATACARD_FILE}': {message}" in str(refused.value)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("duo, purpose, key", [
    (["DUO:0000042", "DUO:0000021"], {"use": "research"}, "ethics_approval"),
    ([{"code": "DUO:0000007", "disease": ["MONDO:0005148"]}], {"use": "research"}, "disease"),
    (["DUO:0000042", "DUO:0000027"], {"use": "research"}, "project"),
    (["DUO:0000042", "DUO:0000012"], {"use": "research"}, "project"),
    (["DUO:0000042", "DUO:0000045"], {"use": "research"}, "organisation"),
    (["DUO:0000042"], {}, "use"),
    (["DUO:0000006"], {"use": "research"}, "area"),
])
def test_a_purpose_missing_what_a_code_requires_is_refused_naming_the_key(tmp_path, duo, purpose, key):
    data = coded(tmp_path / "d", duo)
    with pytest.raises(DataError) as refused:
        check_usage(data, PLASTIC, config=run(**purpose), today=TODAY)
    assert f"data card '{data / DATACARD_FILE}' states DUO:" in str(refused.value)
    assert f"which needs config key 'run.purpose.{key}'; give run.purpose.{key}=" in str(refused.value)


def test_disease_and_project_lists_are_compared(tmp_path):
    data = coded(tmp_path / "d", [{"code": "DUO:0000007", "disease": ["MONDO:0005148"]},
                                  {"code": "DUO:0000027", "projects": ["P-42"]}])
    check_usage(data, PLASTIC, config=run(use="research", disease="MONDO:0005148", project="P-42"), today=TODAY)
    with pytest.raises(DataError, match="research on MONDO:0005148 only, and run.purpose.disease is 'MONDO:0004992'"):
        check_usage(data, PLASTIC, config=run(use="research", disease="MONDO:0004992", project="P-42"), today=TODAY)
    with pytest.raises(DataError, match="projects P-42 only, and run.purpose.project is 'P-7'"):
        check_usage(data, PLASTIC, config=run(use="research", disease="MONDO:0005148", project="P-7"), today=TODAY)


@pytest.mark.parametrize("override, message", [
    ("run.purpose.use=sell", "config key 'run.purpose.use': 'sell' is not valid; valid values: research, commercial"),
    ("run.purpose.organisation=startup", "config key 'run.purpose.organisation': 'startup' is not valid; valid "
                                         "values: academic, non_profit, company, government"),
    ("run.purpose.disease=diabetes", "config key 'run.purpose.disease': 'diabetes' is not valid; expected a disease "
                                     "ontology id"),
    ("run.purpose.area=farming", "config key 'run.purpose.area': 'farming' is not valid; valid values: health, other"),
])
def test_invalid_purpose_values_are_refused_by_the_config_check(override, message):
    from aifactory_train.commands.cli import _validated_train_config

    with pytest.raises(ConfigError) as refused:
        _validated_train_config(["recipe=plastic_sorting", override])
    assert message in str(refused.value)


def test_free_text_consent_keeps_working_with_a_warning(tmp_path, caplog):
    data = tmp_path / "free"
    data.mkdir()
    (data / DATACARD_FILE).write_text(yaml.safe_dump({"owner": "Lifelines", "consent": "broad consent, research"}))
    with caplog.at_level("WARNING"):
        record = check_usage(data, PLASTIC, config=run(use="commercial"), today=TODAY)
    assert record["consent_codes"] == [] and record["consent_stated"]
    assert any("consent is free text" in r.message and "cannot check" in r.message for r in caplog.records)


def test_data_card_check_says_what_a_card_permits_and_refuses_a_bad_one(tmp_path, capsys):
    from aifactory_train.commands.cli import main

    data = coded(tmp_path / "cohort", ["DUO:0000006", "DUO:0000046", "DUO:0000021", "DUO:0000029"],
                 consent="broad consent 2019", usage={"until": "2030-01-01"})
    assert main(["data", "card", "check", str(data)]) == 0
    out = capsys.readouterr().out
    assert "DUO:0000046 (NCU, non-commercial use only): non-commercial use only" in out
    assert "a run must declare: run.purpose.use, run.purpose.area, run.purpose.ethics_approval" in out
    assert "not checked by aift (the user's obligation, recorded with each run): DUO:0000029" in out
    assert "usage terms: until=2030-01-01" in out
    bad = coded(tmp_path / "bad", ["DUO:0000042", "DUO:0000999"])
    assert main(["data", "card", "check", str(bad / DATACARD_FILE)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: data card '{bad / DATACARD_FILE}': duo[1]: 'DUO:0000999'")


# -- the audit log -------------------------------------------------------------------------------------------------
def _append_many(path: str, who: int, count: int) -> None:
    from aifactory_train.records.audit import append

    for n in range(count):
        append(Path(path), {"action": "train", "who": who, "n": n, "padding": "x" * 3000})


def test_the_chain_finds_a_changed_inserted_or_removed_line(tmp_path):
    from aifactory_train.records.audit import append, verify

    log = tmp_path / "aift-audit.jsonl"
    for n in range(5):
        append(log, {"action": "train", "outcome": "ok", "n": n})
    assert verify(log).ok and verify(log).lines == 5
    original = log.read_bytes()
    lines = original.splitlines(keepends=True)

    log.write_bytes(b"".join([*lines[:2], lines[2].replace(b'"outcome":"ok"', b'"outcome":"refused"'), *lines[3:]]))
    verdict = verify(log)
    assert not verdict.ok and verdict.message.startswith("line 4: its prev is not the SHA-256 of line 3: line 3 was "
                                                         "changed")
    log.write_bytes(b"".join([*lines[:2], *lines[3:]]))  # line 3 removed
    assert verify(log).message.startswith("line 3: its prev is not the SHA-256 of line 2")
    log.write_bytes(b"".join([*lines[:2], lines[1], *lines[2:]]))  # a line inserted (a copy, valid JSON)
    assert verify(log).message.startswith("line 3: its prev is not the SHA-256 of line 2")
    log.write_bytes(b"".join(lines[:4]))  # the last line cut off: the head file names 5
    verdict = verify(log)
    assert not verdict.ok and "names 5 lines" in verdict.message and "the log has 4" in verdict.message
    log.write_bytes(b"".join([*lines[:4], lines[4].replace(b'"n":4', b'"n":9')]))  # the last line changed
    assert not verify(log).ok
    log.write_bytes(original)
    assert verify(log).ok


def test_two_processes_appending_at_once_keep_the_chain(tmp_path):
    log = tmp_path / "aift-audit.jsonl"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(str(log), who, 40)) for who in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    from aifactory_train.records.audit import verify

    verdict = verify(log)
    assert verdict.ok and verdict.lines == 80, verdict.message


def test_the_log_goes_beside_the_card_when_writable_else_the_run_folder(tmp_path):
    from aifactory_train.records.audit import AUDIT_FILE, location

    card = coded(tmp_path / "owner", ["DUO:0000004"]) / DATACARD_FILE
    assert location(None, [str(card)], tmp_path / "run") == card.parent / AUDIT_FILE
    assert location(str(tmp_path), [str(card)], tmp_path / "run") == tmp_path / AUDIT_FILE  # audit.path: a folder
    assert location(None, [], tmp_path / "run") == tmp_path / "run" / AUDIT_FILE  # data without a card
    card.parent.chmod(0o555)
    try:
        if os.access(card.parent, os.W_OK):
            pytest.skip("running as root: a read-only folder is still writable")
        assert location(None, [str(card)], tmp_path / "run") == tmp_path / "run" / AUDIT_FILE
    finally:
        card.parent.chmod(0o755)


TRAIN = ["train", "recipe=plastic_sorting", "debug=smoke", "tracking=none", "run_test=false"]


def test_refused_and_allowed_runs_are_logged_and_verify_finds_tampering(plastic_data, tmp_path):
    data = Path(shutil.copytree(plastic_data, tmp_path / "cohort"))
    (data / "aift-audit.jsonl").unlink(missing_ok=True)
    (data / "aift-audit.jsonl.head").unlink(missing_ok=True)
    card = yaml.safe_load((data / DATACARD_FILE).read_text())
    (data / "withdrawn.txt").write_text("train_00001\ntrain_00008\n")  # two subjects' images
    (data / DATACARD_FILE).write_text(yaml.safe_dump({**card, "duo": ["DUO:0000042", "DUO:0000046"],
                                                      "withdrawals": {"list": "withdrawn.txt"}}))
    result = aift(*TRAIN, f"data.root={data}", "run.purpose.use=commercial", "run.purpose.organisation=company",
                  "hydra.run.dir=refused", cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert f"data card '{data / DATACARD_FILE}' does not permit this use" in errors[0] and "DUO:0000046" in errors[0]
    assert not (tmp_path / "refused" / "checkpoints").exists()

    result = aift(*TRAIN, f"data.root={data}", "run.purpose.use=research", "run.purpose.organisation=academic",
                  "hydra.run.dir=allowed", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "allowed" / "summary.json").read_text())
    check = summary["usage_check"]
    assert summary["dataset"]["splits"]["train"]["num_rows"] == 68  # of 70: the withdrawn two left out
    assert summary["dataset"]["datacard"]["withdrawn"].endswith("(sha256 " + __import__("hashlib").sha256(
        b"train_00001\ntrain_00008\n").hexdigest() + ", 2 ids): 2 record(s) left out")
    assert check["withdrawals"][0]["ids"] == 2
    assert check["purpose"]["use"] == "research" and check["consent_codes"][0]["codes"][1]["id"] == "DUO:0000046"
    from aifactory_train.run.provenance import read_provenance

    usage = read_provenance(str(tmp_path / "allowed" / "checkpoints" / "last.ckpt"))["usage"]  # travels with the model
    assert usage["purpose"]["organisation"] == "academic" and usage["duo"][0]["codes"][0]["id"] == "DUO:0000042"

    log = data / "aift-audit.jsonl"  # beside the owner's card
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    refused, allowed = entries[-2], entries[-1]
    assert (refused["action"], refused["outcome"], refused["user"]) == ("train", "refused", OS_USER)
    assert "DUO:0000046" in refused["reason"] and refused["purpose"]["use"] == "commercial"
    assert refused["cards"] == [str(data / DATACARD_FILE)]
    assert (allowed["outcome"], allowed["purpose"]["use"]) == ("ok", "research")
    assert allowed["datasets"][0]["digest"] and allowed["duo"][0]["codes"][1]["id"] == "DUO:0000046"

    from aifactory_train.commands.cli import main

    assert main(["audit", "verify", str(data)]) == 0
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join([lines[0].replace('"refused"', '"ok"'), *lines[1:]]))
    assert main(["audit", "verify", str(log)]) == 1
    assert main(["audit", "verify", str(tmp_path / "nowhere")]) == 2


# -- withdrawn subjects ------------------------------------------------------------------------------------------
def notes_with_subjects(folder: Path, withdrawn: list[str] | None) -> Path:
    """Tagged (de-identified) notes of 6 patients, 2 notes each per split; withdrawn patients' notes carry a marker
    word that no other note has."""
    folder.mkdir(parents=True)
    for split, count in (("train", 12), ("val", 4), ("test", 4)):
        with open(folder / f"{split}.jsonl", "w") as handle:
            for n in range(count):
                patient = f"P{n % 6}"
                marker = " Kwartelkoning." if patient in ("P1", "P4") else ""
                handle.write(json.dumps({"patient_id": patient, "note": f"[PERSOON-1] ({split} {n}) klaagt over "
                                                                         f"hoofdpijn.{marker}",
                                         "summary": f"Hoofdpijn {n}."}) + "\n")
    card = {"owner": "UMCG", "deidentified": True}
    if withdrawn is not None:
        (folder / "withdrawn.txt").write_text("# consent withdrawn\n" + "\n".join(withdrawn) + "\n")
        card["withdrawals"] = {"list": "withdrawn.txt", "field": "patient_id"}
    (folder / DATACARD_FILE).write_text(yaml.safe_dump(card))
    return folder


def _batch_texts(data: Path) -> tuple[list[str], object]:
    from aifactory_train.recipes.clinical_notes.data import ClinicalNotesDataModule

    module = ClinicalNotesDataModule(str(data), {"train": "train.jsonl", "val": "val.jsonl", "test": "test.jsonl"},
                                     tokenizer_vocab_size=300, batch_size=4)
    module.setup("fit")
    texts = []
    for loader in (module.train_dataloader(), module.val_dataloader(), module.test_dataloader()):
        for batch in loader:
            texts += module.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    return texts, module


def test_no_withdrawn_record_reaches_a_batch(tmp_path):
    texts, _ = _batch_texts(notes_with_subjects(tmp_path / "all", None))
    assert any("Kwartelkoning" in t for t in texts)  # the control: without the list they are trained on
    data = notes_with_subjects(tmp_path / "cohort", ["P1", "P4"])
    texts, module = _batch_texts(data)
    assert texts and not any("Kwartelkoning" in t for t in texts)
    assert len(module.records["train"]) == 8 and len(module.records["val"]) == 3
    assert "Kwartelkoning" not in module.tokenizer.get_vocab()  # nor its vocabulary: read after the exclusion
    recorded = module.lineage().datacard["withdrawn"]
    sha = __import__("hashlib").sha256((data / "withdrawn.txt").read_bytes()).hexdigest()
    assert f"{(data / 'withdrawn.txt').resolve()} (sha256 {sha}, 2 ids): 6 record(s) left out" == recorded


def test_withdrawn_images_are_left_out_by_file_name(data_copy):
    from aifactory_train.recipes.plastic_sorting.data import scan_imagefolder
    from aifactory_train.records.withdrawal import summary

    before = scan_imagefolder(data_copy)["train"]
    gone = [before[0][0], before[5][0]]
    (data_copy / "withdrawn.txt").write_text(f"{Path(gone[0]).stem}\n{gone[1]}\n")  # a record id, a path
    card = yaml.safe_load((data_copy / DATACARD_FILE).read_text())
    (data_copy / DATACARD_FILE).write_text(yaml.safe_dump({**card, "withdrawals": "withdrawn.txt"}))
    check_usage(data_copy, PLASTIC, config=run(), today=TODAY)  # what every command does first: reads the lists
    after = scan_imagefolder(data_copy)["train"]
    assert len(after) == len(before) - 2 and not {rel for rel, _ in after} & set(gone)
    assert summary(data_copy)[0]["excluded"] == 2


@pytest.mark.parametrize("section, files, message", [
    ({"list": "missing.txt"}, {}, "withdrawals.list 'missing.txt': '{root}/missing.txt' cannot be read (No such file "
                                  "or directory)"),
    ({"list": "w.txt", "colum": "x"}, {"w.txt": b"P1\n"},
     "withdrawals has unknown key(s) ['colum']; valid: list, field"),
    ({"list": "w.txt"}, {"w.txt": b"\xff\xfe"}, "withdrawals.list '{root}/w.txt' is not UTF-8 text"),
    (["w.txt"], {}, "withdrawals must be a mapping of list, field"),
])
def test_a_withdrawal_list_that_cannot_be_read_refuses_the_use(tmp_path, section, files, message):
    root = tmp_path / "cohort"
    root.mkdir()
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / DATACARD_FILE).write_text(yaml.safe_dump({"owner": "UMCG", "withdrawals": section}))
    with pytest.raises(DataError) as refused:
        check_usage(root, PLASTIC, config=run(), today=TODAY)
    assert f"data card '{root / DATACARD_FILE}': " + message.format(root=root.resolve()) in str(refused.value)


def test_the_purpose_and_codes_reach_an_exported_models_metadata(tmp_path):
    from aifactory_train.records.consent import provenance_entry
    from aifactory_train.run.provenance import onnx_metadata

    data = coded(tmp_path / "cohort", ["DUO:0000042", "DUO:0000046"])
    record = check_usage(data, PLASTIC, config=run(use="research", organisation="academic"), today=TODAY)
    document = {"recorded": True, **provenance_entry(record), "export": {}}
    metadata = onnx_metadata(document)  # also the registered model version's tags (export.register_export)
    assert metadata["aift.usage.duo"] == f"DUO:0000042 DUO:0000046 ({data / DATACARD_FILE})"
    assert metadata["aift.usage.purpose"] == "use=research; organisation=academic"
    assert json.loads(metadata["aift.provenance"])["usage"]["purpose"]["use"] == "research"


def test_a_refused_launch_is_in_the_owners_audit_log(plastic_data, tmp_path, monkeypatch):
    from aifactory_train.commands.cli import main

    data = Path(shutil.copytree(plastic_data, tmp_path / "cohort"))
    for name in ("aift-audit.jsonl", "aift-audit.jsonl.head"):
        (data / name).unlink(missing_ok=True)
    card = yaml.safe_load((data / DATACARD_FILE).read_text())
    (data / DATACARD_FILE).write_text(yaml.safe_dump({**card, "duo": ["DUO:0000042", "DUO:0000046"]}))
    monkeypatch.chdir(tmp_path)
    code = main(["launch", "recipe=plastic_sorting", "cluster=aifactory_h100", "strategy=ddp", f"data.root={data}",
                 "run.purpose.use=commercial", "run.purpose.organisation=company"])
    assert code == 2 and not (tmp_path / "outputs").exists()
    line = json.loads((data / "aift-audit.jsonl").read_text().splitlines()[-1])
    assert (line["action"], line["outcome"]) == ("launch", "refused") and "DUO:0000046" in line["reason"]
