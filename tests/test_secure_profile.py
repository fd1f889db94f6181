"""``profile=secure`` (aifactory_train/records/secure.py): required by sensitive data, and what it enforces: a
tracking allowlist, Hugging Face offline, no network but loopback (a real connection attempt), owner-only files, no
sample logging, the Slurm secure partition, and a private temporary folder removed also after a failure."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import socket
import stat
import tempfile
from pathlib import Path

import pytest
import yaml

from aifactory_train.errors import ConfigError, DataError
from aifactory_train.records.secure import EgressRefused, check_profile, check_tracking, secure_profile
from aifactory_train.records.usage_terms import DATACARD_FILE
from conftest import aift


def card(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DATACARD_FILE).write_text(yaml.safe_dump({"owner": "UMCG", **fields}))
    return folder / DATACARD_FILE


def config(profile: str = "secure", uri: str = "sqlite:///mlflow.db", root: Path | None = None, **recipe) -> dict:
    return {"profile": {"name": profile}, "tracking": {"backend": "mlflow", "uri": uri},
            "recipe": {"name": "any", "module": {}, **recipe}, "data": {"root": str(root)} if root else None}


def compose(overrides: list[str], tmp_path: Path):
    from aifactory_train.records.config import compose_train_config, validate

    cfg = compose_train_config(overrides, tmp_path / "run")
    return validate(cfg)


# -- when it is required -------------------------------------------------------------------------------------------
def test_a_high_sensitivity_card_requires_the_profile_naming_the_card(tmp_path):
    path = card(tmp_path / "cohort", sensitivity="high")
    with pytest.raises(DataError) as refused:
        check_profile(config("default"), None, [path])
    assert str(refused.value) == (f"data card '{path}' marks the data sensitivity: high: it may be used under "
                                  f"profile=secure only; add profile=secure to the command")
    record = {}
    check_profile(config("secure"), record, [path])
    assert record["profile"]["name"] == "secure" and record["profile"]["egress"] == ["loopback"]
    check_profile(config("default"), {}, [card(tmp_path / "open", sensitivity="low")])  # low: not required


def test_a_refused_run_writes_nothing(plastic_data, tmp_path, monkeypatch, capsys):
    from aifactory_train.commands.cli import main

    data = Path(shutil.copytree(plastic_data, tmp_path / "cohort"))
    path = card(data, **{**yaml.safe_load((data / DATACARD_FILE).read_text()), "sensitivity": "high"})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exited:
        main(["train", "recipe=plastic_sorting", f"data.root={data}", "tracking=none", "hydra.run.dir=refused"])
    assert exited.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: data card '{path}' marks the data sensitivity: high: it may be used under "
                      f"profile=secure only; add profile=secure to the command"]
    assert not (tmp_path / "refused").exists() and not (tmp_path / "mlflow.db").exists()
    line = json.loads((data / "aift-audit.jsonl").read_text().splitlines()[-1])  # the owner's audit log says so
    assert (line["action"], line["outcome"]) == ("train", "refused") and "sensitivity: high" in line["reason"]


def marked(clinical_raw: Path, tmp_path: Path) -> Path:
    """The raw notes with a card that says they are de-identified (what `aift data deidentify` writes)."""
    notes = Path(shutil.copytree(clinical_raw, tmp_path / "notes"))
    card(notes, **{**yaml.safe_load((notes / DATACARD_FILE).read_text()), "deidentified": "true"})
    return notes


def test_the_text_recipe_requires_it_for_notes_not_marked_de_identified(clinical_raw, tmp_path):
    from aifactory_train.records.config import check_data

    raw = ["recipe=clinical_notes", f"data.root={clinical_raw}", "data.deidentify=inline", "tracking=none"]
    with pytest.raises(DataError) as refused:
        check_data(compose(raw, tmp_path))
    assert f"data card '{clinical_raw / DATACARD_FILE}' does not mark the data deidentified: true" in str(refused.value)
    assert "recipe.secure_unless_card: deidentified" in str(refused.value)
    assert str(refused.value).endswith("add profile=secure to the command")
    assert check_data(compose([*raw, "profile=secure"], tmp_path))["profile"]["name"] == "secure"
    # de-identified notes (the card says so) need no profile
    notes = marked(clinical_raw, tmp_path)
    record = check_data(compose(["recipe=clinical_notes", f"data.root={notes}", "tracking=none"], tmp_path))
    assert record["profile"] == {"name": "default"}


def test_sample_logging_is_refused_under_the_profile(clinical_raw, tmp_path):
    from aifactory_train.records.config import check_data

    typed = compose(["recipe=clinical_notes", f"data.root={marked(clinical_raw, tmp_path)}", "tracking=none",
                     "profile=secure", "recipe.module.log_samples=3"], tmp_path)
    with pytest.raises(ConfigError, match=r"^config key 'recipe.module.log_samples': 3 is not allowed under "
                                          r"profile=secure .*; valid: 0$"):
        check_data(typed)


def test_data_check_shows_no_samples_of_high_sensitivity_data(tmp_path, capsys):
    from aifactory_train.data.data_check import run_data_check
    from aifactory_train.recipes.plastic_sorting.synth import synthesize

    data = synthesize(tmp_path / "cohort", size=12, seed=3)  # small: the check reads every image
    path = card(data, **{**yaml.safe_load((data / DATACARD_FILE).read_text()), "sensitivity": "high"})
    run_data_check(["recipe=plastic_sorting", f"data.root={data}"], str(tmp_path / "report"))
    report = json.loads((tmp_path / "report" / "data_check.json").read_text())
    assert report["contact_sheet"] == {"file": None, "reason": f"data card '{path}' marks the data sensitivity: high: "
                                                               f"no data samples are shown"}
    assert not (tmp_path / "report" / "contact_sheet.png").exists()
    assert (tmp_path / "report" / "class_histogram.png").is_file()  # counts are no samples


# -- tracking ------------------------------------------------------------------------------------------------------
def test_tracking_only_to_a_local_store_or_a_host_the_card_allowlists(tmp_path):
    plain = card(tmp_path / "plain", sensitivity="high")
    listed = card(tmp_path / "listed", sensitivity="high",
                  usage={"tracking": ["mlflow.umcg.example:5000", "https://tracking.rug.example"]})
    for uri in ("sqlite:///mlflow.db", f"sqlite:///{tmp_path}/m.db", f"file:{tmp_path}/mlruns", "mlruns",
                "http://127.0.0.1:5000", "http://localhost:5000", "http://[::1]:5000"):
        assert check_tracking(config(uri=uri), [plain]) is None, uri
    assert check_tracking(config(uri="http://mlflow.umcg.example:5000"), [listed]) == "mlflow.umcg.example"
    assert check_tracking(config(uri="https://u:pw@tracking.rug.example"), [listed]) == "tracking.rug.example"
    with pytest.raises(ConfigError) as refused:
        check_tracking(config(uri="http://bob:secret@mlflow.elsewhere.example:5000"), [listed])
    message = str(refused.value)
    assert message.startswith("config key 'tracking.uri': 'http://bob:***@mlflow.elsewhere.example:5000' is not "
                              f"allowed under profile=secure: data card(s) '{listed}' allow usage.tracking "
                              f"['mlflow.umcg.example', 'tracking.rug.example']; valid: a local store")
    assert "secret" not in message
    with pytest.raises(ConfigError, match="'databricks://team' is not allowed under profile=secure"):
        check_tracking(config(uri="databricks://team"), [listed])  # no host, and not a local store
    with pytest.raises(ConfigError, match=f"no data card \\('{plain}'\\) lists a usage.tracking host"):
        check_tracking(config(uri="http://mlflow.umcg.example:5000"), [plain])
    with pytest.raises(DataError, match=r"usage.tracking must be a non-empty list of names"):
        check_tracking(config(uri="http://x.example"), [card(tmp_path / "bad", usage={"tracking": []})])


# -- in the running process ------------------------------------------------------------------------------------------
def _child(queue) -> None:
    """In a forked child (a DataLoader worker): the variables and the network fence are inherited."""
    try:
        socket.create_connection(("192.0.2.1", 80), timeout=2)
        outcome = "connected"
    except EgressRefused as err:
        outcome = str(err)
    except OSError as err:
        outcome = f"not refused by the profile: {err}"
    queue.put({"offline": os.environ.get("HF_HUB_OFFLINE"), "tmpdir": tempfile.gettempdir(), "outcome": outcome,
               "umask": os.umask(0o077)})


def test_the_process_is_offline_fenced_and_owner_only_and_its_temp_folder_goes(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("written before the profile\n")
    server = socket.create_server(("127.0.0.1", 0))
    before = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TMPDIR")}
    with secure_profile(config(), run_dir) as info:
        private = Path(info["tmpdir"])
        assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
        assert os.environ["TRANSFORMERS_OFFLINE"] == "1" and tempfile.gettempdir() == str(private)
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
        # a real connection attempt to a non-loopback address fails with the profile's error, naming the address
        with pytest.raises(EgressRefused, match=r"^profile=secure: network (connection to|lookup of '?)192\.0\.2\.1"):
            socket.create_connection(("192.0.2.1", 80), timeout=2)
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with pytest.raises(EgressRefused, match=r"^profile=secure: network connection to 192\.0\.2\.1:9 refused"):
            raw.connect(("192.0.2.1", 9))
        raw.close()
        with pytest.raises(EgressRefused, match=r"lookup of 'pypi\.org' refused"):
            socket.getaddrinfo("pypi.org", 443)
        with pytest.raises(EgressRefused, match=r"lookup of 'pypi\.org' refused"):
            socket.gethostbyname("pypi.org")
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with pytest.raises(EgressRefused, match=r"connection to 198\.51\.100\.7:53 refused"):
            udp.sendto(b"x", ("198.51.100.7", 53))
        udp.close()
        with socket.create_connection(server.getsockname(), timeout=2):  # loopback still works
            server.accept()[0].close()
        written = run_dir / "checkpoint.ckpt"
        written.write_bytes(b"weights")
        assert stat.S_IMODE(written.stat().st_mode) == 0o600
        assert stat.S_IMODE((run_dir / ".hydra" / "config.yaml").stat().st_mode) & 0o077 == 0
        assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
        queue = multiprocessing.get_context("fork").Queue()
        child = multiprocessing.get_context("fork").Process(target=_child, args=(queue,))
        child.start()
        seen = queue.get(timeout=30)
        child.join(30)
        assert seen["offline"] == "1" and seen["tmpdir"] == str(private) and seen["umask"] == 0o077
        assert seen["outcome"].startswith("profile=secure: network"), seen["outcome"]
        assert "192.0.2.1" in seen["outcome"]
    server.close()
    assert not private.exists()
    assert {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TMPDIR")} == before
    socket.getaddrinfo("192.0.2.1", 80)  # lifted: a numeric lookup (no network) goes through again


def _own_address() -> str | None:
    """A non-loopback IPv4 address of this machine (a server bound to all addresses answers on it)."""
    import psutil

    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    return None


def test_a_server_on_this_machines_own_network_address_is_out_of_reach(tmp_path):
    own = _own_address()
    if own is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    server = socket.create_server(("0.0.0.0", 0))
    port = server.getsockname()[1]
    with socket.create_connection((own, port), timeout=5):  # reachable without the profile
        server.accept()[0].close()
    with secure_profile(config(), tmp_path / "run"):
        with pytest.raises(EgressRefused, match=f"^profile=secure: network (connection to|lookup of '?){own}"):
            socket.create_connection((own, port), timeout=5)
        with socket.create_connection(("127.0.0.1", port), timeout=5):  # the same server over loopback
            server.accept()[0].close()
    server.close()


def test_the_private_temp_folder_is_removed_after_a_failure(tmp_path):
    with pytest.raises(RuntimeError, match="the run failed"):
        with secure_profile(config(), tmp_path / "run") as info:
            private = Path(info["tmpdir"])
            Path(tempfile.mkstemp()[1]).write_text("partial")  # in the private folder
            assert len(list(private.iterdir())) == 1
            raise RuntimeError("the run failed")
    assert not private.exists()
    socket.getaddrinfo("192.0.2.1", 80)


def test_without_the_profile_nothing_changes(tmp_path):
    with secure_profile(config("default"), tmp_path / "run") as info:
        assert info is None
        socket.getaddrinfo("192.0.2.1", 80)


# -- Slurm -----------------------------------------------------------------------------------------------------------
def test_launch_pins_the_secure_partition_and_refuses_a_profile_without_one(plastic_data, tmp_path, monkeypatch,
                                                                           capsys):
    from aifactory_train.commands.cli import main

    monkeypatch.chdir(tmp_path)
    base = ["launch", "--dry-run", "recipe=plastic_sorting", "strategy=ddp", f"data.root={plastic_data}"]
    h100 = ["cluster=aifactory_h100", "cluster.hardware=null"]  # no plan check (it builds the model)
    assert main([*base, *h100, "profile=secure"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --partition=gpu_h100_secure" in out and "profile=secure" in out.split("aift train", 1)[1]
    assert main([*base, *h100]) == 0
    assert "#SBATCH --partition=gpu_h100\n" in capsys.readouterr().out
    assert main([*base, "cluster=slurm", "profile=secure"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == ["error: config key 'cluster.secure_partition': cluster profile 'slurm' has none, and "
                      "profile=secure runs only on the secure partition; valid: a cluster profile with "
                      "secure_partition: NAME (configs/cluster/*.yaml), or cluster.secure_partition=NAME"]
    assert not (tmp_path / "outputs").exists()


# -- a real run ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def secure_run(plastic_data, tmp_path_factory) -> dict:
    """One real `aift train profile=secure` on a copy of the plastic data whose card says sensitivity: high."""
    work = tmp_path_factory.mktemp("secure")
    data = Path(shutil.copytree(plastic_data, work / "cohort"))
    path = card(data, **{**yaml.safe_load((data / DATACARD_FILE).read_text()), "sensitivity": "high"})
    uri = f"sqlite:///{work}/mlflow.db"
    result = aift("train", "recipe=plastic_sorting", "debug=smoke", "run_test=false", f"data.root={data}",
                  "data.num_workers=1", "profile=secure", f"tracking.uri={uri}", "tracking.system_metrics=false",
                  "hydra.run.dir=run", cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"work": work, "data": data, "card": path, "uri": uri, "run": work / "run",
            "summary": json.loads((work / "run" / "summary.json").read_text())}


@pytest.mark.e2e
def test_a_secure_run_trains_offline_owner_only_and_records_the_profile(secure_run):
    run, summary = secure_run["run"], secure_run["summary"]
    assert summary["usage_check"]["profile"]["name"] == "secure"
    assert summary["usage_check"]["profile"]["required_by"] == [
        f"data card '{secure_run['card']}' marks the data sensitivity: high"]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    loose = [f"{p.relative_to(run)} {oct(stat.S_IMODE(p.stat().st_mode))}" for p in [run, *run.rglob("*")]
             if not p.is_symlink() and stat.S_IMODE(p.stat().st_mode) & 0o077]
    assert not loose, loose  # the run folder, its checkpoints and Hydra's record: owner-only
    assert stat.S_IMODE((secure_run["work"] / "mlflow.db").stat().st_mode) & 0o077 == 0
    log = (run / "train.log").read_text()
    assert "profile=secure: offline, network to loopback only, owner-only files" in log
    private = re.search(r"temporary files in (\S+)", log).group(1)
    assert not Path(private).exists()  # removed at the end
    from mlflow.tracking import MlflowClient

    tags = MlflowClient(secure_run["uri"]).get_run(summary["mlflow_run_id"]).data.tags
    assert tags["aift.profile"] == "secure"


def _data_runs(secure_run, out: Path, capsys) -> tuple[dict, str]:
    from aifactory_train.commands.cli import main

    assert main(["data", "runs", "recipe=plastic_sorting", f"data.root={secure_run['data']}",
                 f"tracking.uri={secure_run['uri']}", "--out", str(out)]) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


@pytest.mark.e2e
def test_data_runs_names_the_runs_trained_before_the_current_withdrawal_list(secure_run, tmp_path, monkeypatch,
                                                                             capsys):
    import hashlib

    from aifactory_train.records.config import build, compose_train_config
    from aifactory_train.records.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    data, old_id = secure_run["data"], secure_run["summary"]["mlflow_run_id"]
    # a subject withdraws: their training image is left out from now on, and the run trained on it
    (data / "withdrawn.txt").write_text("train_00001\n")
    card(data, **{**yaml.safe_load((data / DATACARD_FILE).read_text()), "withdrawals": {"list": "withdrawn.txt"}})
    listed = str((data / "withdrawn.txt").resolve())
    sha_one = hashlib.sha256(b"train_00001\n").hexdigest()
    report, out = _data_runs(secure_run, tmp_path / "after.json", capsys)
    (old,) = report["runs"]
    assert old["run_id"] == old_id and "train" not in old["splits"]  # found by its data.root: the digest changed
    assert old["withdrawal"] == {"before_current_list": True, "lists": [
        {"list": listed, "current_sha256": sha_one, "run_sha256": None}]}
    assert f"TRAINED BEFORE THE CURRENT WITHDRAWAL LIST (the run: {listed}: not applied)" in out
    assert "1 run(s) trained before the current withdrawal list: retrain them" in out

    # the model retrained under the list: a run logged by the tracker as `aift train` logs one
    cfg = compose_train_config(["recipe=plastic_sorting", f"data.root={data}", f"tracking.uri={secure_run['uri']}"],
                               tmp_path / "retrained")
    datamodule = build(cfg.data, _convert_="all")
    datamodule.setup("fit")
    lineage = datamodule.lineage()
    (tmp_path / "retrained").mkdir()
    tracker = Tracker({"backend": "mlflow", "uri": secure_run["uri"], "experiment": "plastic_sorting", "tags": {}},
                      tmp_path / "retrained", resume=False)
    tracker.lightning_logger()
    (tmp_path / "config.yaml").write_text("recipe: {name: plastic_sorting}\n")
    tracker.log_run_start({"recipe": {"name": "plastic_sorting"}}, tmp_path / "config.yaml", lineage)
    tracker.finish("FINISHED")
    report, out = _data_runs(secure_run, tmp_path / "retrained.json", capsys)
    status = {r["run_id"]: r["withdrawal"]["before_current_list"] for r in report["runs"]}
    assert status == {old_id: True, tracker.run_id: False}
    assert "1 run(s) trained before the current withdrawal list: retrain them" in out

    # another subject withdraws: the list changed, so the retrained run is behind it too
    (data / "withdrawn.txt").write_text("train_00001\ntrain_00008\n")
    report, out = _data_runs(secure_run, tmp_path / "again.json", capsys)
    (retrained,) = [r for r in report["runs"] if r["run_id"] == tracker.run_id]
    assert retrained["withdrawal"]["before_current_list"]
    assert retrained["withdrawal"]["lists"][0]["run_sha256"] == sha_one
    assert "2 run(s) trained before the current withdrawal list: retrain them" in out
