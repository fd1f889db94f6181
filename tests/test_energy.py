"""Energy per training run: counters read over the run, kept as files in the run folder, added up over resumes,
into summary.json and MLflow. The CPU (powercap) path runs here against counter files a test thread keeps
counting (this machine has no RAPL counter); the NVML path needs a GPU and runs in benchmarks/gpu."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import aift

SMOKE = ["recipe=plastic_sorting", "debug=smoke", "data.batch_size=16"]


def test_powercap_counter_adds_packages_only_and_survives_a_wraparound(tmp_path):
    from aifactory_train.records.energy import RaplCounter

    root = tmp_path / "powercap"
    for zone, start in (("intel-rapl:0", 900), ("intel-rapl:1", 100), ("intel-rapl:0:0", 0)):
        (root / zone).mkdir(parents=True)
        (root / zone / "max_energy_range_uj").write_text("999\n")
        (root / zone / "energy_uj").write_text(f"{start}\n")
    counter = RaplCounter(root)
    assert counter.devices == ["intel-rapl:0:?", "intel-rapl:1:?"]
    (root / "intel-rapl:0" / "energy_uj").write_text("50\n")  # wrapped: 900 -> 999 -> 0 -> 50 is 150 uJ
    (root / "intel-rapl:1" / "energy_uj").write_text("400\n")  # 300 uJ
    (root / "intel-rapl:0:0" / "energy_uj").write_text("777\n")  # a sub-zone: part of package 0, not added
    assert counter.read() == pytest.approx(450e-6)
    (root / "intel-rapl:1" / "energy_uj").write_text("500\n")
    assert counter.read() == pytest.approx(550e-6)


def test_run_energy_adds_every_file_and_names_the_unreadable_ones(tmp_path):
    from aifactory_train.records.energy import ENERGY_DIR, read_run_energy

    folder = tmp_path / ENERGY_DIR
    folder.mkdir()
    records = [("a-n1-7-rank0-nvml", 0, "GPU-1", 100.0), ("a-n1-8-rank1-nvml", 1, "GPU-2", 110.0),
               ("b-n1-9-rank0-nvml", 0, "GPU-1", 40.0)]
    for name, rank, device, joules in records:
        (folder / f"{name}.json").write_text(json.dumps({"meter": "nvml", "devices": [device], "host": "n1",
                                                         "rank": rank, "joules": joules, "seconds": 10.0}))
    (folder / "c-n1-3-rank0-nvml.json").write_text('{"meter": "nv')  # cut short: a disk that filled up
    (folder / "d-n1-4-rank0-nvml.tmp").write_text("{}")  # a write in progress is not a record
    (folder / "e-n2-5-rank2-nvml.json").write_text(json.dumps({"meter": "nvml", "host": "n2", "rank": 2,
                                                              "error": "NVMLError_NotSupported: Not Supported"}))
    total = read_run_energy(tmp_path)
    summary = total.as_dict()
    assert summary["joules"] == pytest.approx(250.0) and summary["meter"] == "nvml"
    assert (summary["files"], summary["devices"], summary["segments"]) == (3, 2, 2)
    assert total.skipped == ["c-n1-3-rank0-nvml.json"]
    assert total.unmeasured == ["n2 rank 2 nvml: NVMLError_NotSupported: Not Supported"]
    assert summary["kwh"] == pytest.approx(250.0 / 3.6e6) and summary["mean_watts"] == pytest.approx(250 / 30, abs=1e-3)
    assert read_run_energy(tmp_path / "elsewhere") is None


def test_a_gpu_run_adds_its_hosts_cpu_packages_and_each_part_is_shown(tmp_path):
    """Two job starts of a GPU run on one node, 2 ranks: each rank's GPU (NVML) and, from local rank 0, the CPU
    packages (powercap). The parts add up; a job start with two counters on rank 0 is still one segment."""
    from aifactory_train.records.energy import ENERGY_DIR, read_run_energy

    folder = tmp_path / ENERGY_DIR
    folder.mkdir()
    files = [("j1-n1-7-rank0-nvml", 0, "nvml", ["GPU-1"], 700.0), ("j1-n1-8-rank1-nvml", 1, "nvml", ["GPU-2"], 690.0),
             ("j1-n1-7-rank0-rapl", 0, "rapl", ["intel-rapl:0:package-0", "intel-rapl:1:package-1"], 300.0),
             ("j2-n1-9-rank0-nvml", 0, "nvml", ["GPU-1"], 70.0),
             ("j2-n1-9-rank0-rapl", 0, "rapl", ["intel-rapl:0:package-0", "intel-rapl:1:package-1"], 30.0)]
    for name, rank, meter, devices, joules in files:
        (folder / f"{name}.json").write_text(json.dumps({"meter": meter, "devices": devices, "host": "n1",
                                                         "rank": rank, "joules": joules, "seconds": 1.0}))
    summary = read_run_energy(tmp_path).as_dict()
    assert summary["meter"] == "nvml+rapl" and summary["joules"] == pytest.approx(1790.0)
    assert summary["segments"] == 2 and summary["devices"] == 4 and summary["files"] == 5
    assert summary["by_meter"]["nvml"]["joules"] == pytest.approx(1460.0)
    assert summary["by_meter"]["nvml"]["devices"] == 2 and summary["by_meter"]["rapl"]["devices"] == 2
    assert summary["by_meter"]["rapl"]["joules"] == pytest.approx(330.0)
    assert summary["by_meter"]["rapl"]["mean_watts"] == pytest.approx(165.0)


def test_auto_reads_what_this_machine_has_and_says_what_it_left_out(powercap, tmp_path):
    """This machine has no NVIDIA driver: a GPU run's ``auto`` would read the CPU packages only, and say why the
    GPUs are not counted; asking for both on purpose is refused."""
    from aifactory_train.records.energy import check_meter
    from aifactory_train.errors import ConfigError

    cfg = {"meter": "auto", "powercap_dir": str(powercap.root)}
    assert check_meter(cfg, on_gpu=False) == (("rapl",), None)
    meters, reason = check_meter(cfg, on_gpu=True)
    assert meters == ("rapl",) and reason.startswith("no NVIDIA energy counter here")
    meters, reason = check_meter({**cfg, "powercap_dir": str(tmp_path / "none")}, on_gpu=False)
    assert meters == () and "no CPU energy counter (powercap/RAPL)" in reason
    with pytest.raises(ConfigError, match="'nvml\\+rapl' cannot be read on .*no NVIDIA energy counter"):
        check_meter({**cfg, "meter": "nvml+rapl"}, on_gpu=True)
    with pytest.raises(ConfigError, match="'nvml\\+rapl' reads the GPUs a run trains on"):
        check_meter({**cfg, "meter": "nvml+rapl"}, on_gpu=False)


def test_a_rank_that_cannot_open_its_counter_trains_on_and_the_total_says_so(tmp_path):
    """A real (tiny) Lightning fit whose counter vanished between the check and the start of fit (as a MIG slice
    without a counter does on NVML): training finishes, and the run's energy names what it left out."""
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    from aifactory_train.run.callbacks import EnergyMeter
    from aifactory_train.records.energy import summarize

    meter = EnergyMeter(("rapl",), {"powercap_dir": str(tmp_path / "gone"), "sample_every_s": 1.0}, tmp_path)
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[meter],
                        default_root_dir=tmp_path)
    trainer.fit(BoringModel())
    meter.finish()
    assert trainer.global_step == 2
    energy = summarize(tmp_path, reason=None)
    assert energy["measured"] is False
    assert "rank 0 rapl: FileNotFoundError: no package zones (intel-rapl:N)" in energy["reason"]


def energy_files(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run / "energy").glob("*.json"))]


def test_energy_of_a_run_resumed_for_another_epoch_adds_both_jobs(plastic_data, powercap, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = tmp_path / "run"
    common = [*SMOKE, f"data.root={plastic_data}", f"hydra.run.dir={run}", f"tracking.uri={uri}",
              "energy.meter=rapl", f"energy.powercap_dir={powercap.root}", "energy.sample_every_s=0.5"]
    first = aift("train", *common, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    e1 = json.loads((run / "summary.json").read_text())["energy"]
    # the counter ran at 50 W (and wrapped): what the run read must be 50 W over the time it measured
    (record,) = energy_files(run)
    assert record["meter"] == "rapl" and record["devices"] == ["intel-rapl:0:package-0"]
    assert record["seconds"] > 1 and record["joules"] == pytest.approx(50.0 * record["seconds"], rel=0.05)
    assert e1["measured"] and e1["segments"] == 1 and e1["joules"] == pytest.approx(record["joules"], abs=1e-3)
    assert e1["by_meter"]["rapl"]["joules"] == e1["joules"] and e1["not_counted"] is None

    second = aift("train", *common, "ckpt_path=last", "trainer.max_epochs=2", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    e2 = summary["energy"]
    records = energy_files(run)
    assert len(records) == 2 and e2["segments"] == 2 and e2["devices"] == 1
    assert e2["joules"] == pytest.approx(sum(r["joules"] for r in records), abs=1e-3)
    assert e2["joules"] > e1["joules"] + 25  # the second job's own share (> 0.5 s at 50 W) came on top
    assert e2["mean_watts"] == pytest.approx(50.0, rel=0.05)
    metrics = MlflowClient(tracking_uri=uri).get_run(summary["mlflow_run_id"]).data.metrics
    assert metrics["energy/kwh"] == pytest.approx(e2["kwh"]) and metrics["energy/joules"] == pytest.approx(e2["joules"])

    # a fresh start in the same folder counts only itself; the earlier run's files are kept aside, not deleted
    third = aift("train", *common, cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-3000:]
    e3 = json.loads((run / "summary.json").read_text())["energy"]
    assert e3["segments"] == 1 and len(energy_files(run)) == 1
    (aside,) = run.glob("energy.before-*")
    assert len(list(aside.glob("*.json"))) == 2


@pytest.mark.parametrize("meter", ["rapl", "nvml"])
def test_a_meter_this_run_cannot_read_is_refused_before_the_run_is_tracked(meter, plastic_data, tmp_path):
    result = aift("train", *SMOKE, f"data.root={plastic_data}", f"hydra.run.dir={tmp_path}/run",
                  f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"energy.meter={meter}", "trainer.accelerator=cpu",
                  f"energy.powercap_dir={tmp_path}/no-powercap", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    if meter == "rapl":
        assert "config key 'energy.meter': 'rapl' cannot be read" in result.stderr
        assert f"{tmp_path}/no-powercap" in result.stderr and "valid: auto (measures where it can)" in result.stderr
    else:
        assert "config key 'energy.meter': 'nvml' reads the GPUs" in result.stderr
        assert "trains on the CPU; valid here: auto, rapl, none" in result.stderr
    assert not (tmp_path / "run" / "summary.json").exists()
    if (tmp_path / "mlflow.db").exists():
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
        assert not client.search_runs([e.experiment_id for e in client.search_experiments()])
