"""Energy per training run, from the hardware's own energy counters, kept as files in the run folder.

* **GPUs**: NVML's total-energy counter (millijoules since the driver loaded; Volta and newer). Each rank reads
  the GPU it trains on, found by UUID, so Slurm's ``CUDA_VISIBLE_DEVICES`` binding cannot mix GPUs up.
* **CPUs**: the kernel's powercap counters (Intel RAPL; AMD too on Linux >= 5.8), one per CPU package, read by
  each node's local rank 0 (a package counter covers the whole socket, which the node's ranks share). They wrap
  at ``max_energy_range_uj``; reading at least every ``sample_every_s`` seconds keeps every wrap seen.
* A GPU run reads both where it can (``energy.meter=auto``): the GPUs do the training, but the host's CPUs draw
  power for it too, and GPU and package counters measure disjoint parts. Still not counted: memory (DRAM zones),
  network, fans and power-supply losses; a node's wall-plug meter (its BMC) sees those.

Counters, not power samples: MLflow's system metrics sample power every few seconds, and the sum of those samples
misses whatever happened between them. A counter is integrated by the hardware.

Why not CodeCarbon or Zeus: both measure a window inside one process. A training run here is many processes on
many nodes, and a run that is requeued continues in new processes. What must add up is the files, so the part
that counts is this module's either way. The counter reads themselves are a few lines each.

Each counter a process reads has its file, ``<run>/energy/<start>-<host>-<pid>-rank<r>-<meter>.json``. A background
thread rewrites it
every ``sample_every_s`` seconds, and the end of the run rewrites it once more. A requeued or resumed job adds
files of its own. The run's energy is the sum of all the files, so work redone after a kill counts too: that
energy was spent. A kill without warning loses at most the last ``sample_every_s`` seconds.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aifactory_train import slurm_env
from aifactory_train.errors import ConfigError

log = logging.getLogger(__name__)


def node_name() -> str:
    """Slurm's name of this node (what admins and `sacct` know it by), else the host name."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()

ENERGY_DIR = "energy"
JOULES_PER_KWH = 3.6e6


class NvmlCounter:
    """One GPU's NVML total-energy counter, in joules."""

    kind = "nvml"

    def __init__(self, uuid: str):
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        self.devices = [uuid]
        self.read()  # raises NVMLError_NotSupported on GPUs (or MIG slices) without the counter

    def read(self) -> float:
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1000


def nvml_available() -> str | None:
    """None when NVML answers and its first GPU has an energy counter, else why not."""
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlDeviceGetTotalEnergyConsumption(pynvml.nvmlDeviceGetHandleByIndex(0))
    except Exception as err:  # noqa: BLE001 - no library, no driver, no GPU or no counter: all "not here"
        return f"no NVIDIA energy counter here ({type(err).__name__}: {err})"
    return None


def cuda_uuid(device_index: int) -> str:
    """NVML's name of the CUDA device ``device_index`` of this process (CUDA numbers only the visible GPUs)."""
    import torch

    uuid = str(torch.cuda.get_device_properties(device_index).uuid)  # torch: the bare UUID, without NVML's prefix
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid.lower()}"


class RaplCounter:
    """The CPU packages' powercap counters (``<powercap_dir>/intel-rapl:N/energy_uj``), summed, in joules.

    Only the top-level zones (packages) are read: their sub-zones (cores, uncore, dram) are parts of them or are
    reported apart by some CPUs, and adding them would count energy twice or mix in another scope."""

    kind = "rapl"

    def __init__(self, powercap_dir: str | Path):
        root = Path(powercap_dir)
        self.zones = sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1)
        if not self.zones:
            raise FileNotFoundError(f"no package zones (intel-rapl:N) in {root}")
        self.devices = [f"{z.name}:{(z / 'name').read_text().strip() if (z / 'name').is_file() else '?'}"
                        for z in self.zones]
        self._ranges = [int((z / "max_energy_range_uj").read_text()) for z in self.zones]
        self._last = [self._read_uj(z) for z in self.zones]  # raises PermissionError where only root may read
        self._joules = 0.0
        self._lock = threading.Lock()

    @staticmethod
    def _read_uj(zone: Path) -> int:
        return int((zone / "energy_uj").read_text())

    def read(self) -> float:
        with self._lock:
            for i, zone in enumerate(self.zones):
                now = self._read_uj(zone)
                delta = now - self._last[i]
                if delta < 0:  # wrapped around since the last read
                    delta += self._ranges[i] + 1
                self._joules += delta / 1e6
                self._last[i] = now
            return self._joules


def rapl_available(powercap_dir: str | Path) -> str | None:
    try:
        RaplCounter(powercap_dir)
    except PermissionError:  # Linux >= 5.10 makes energy_uj root-only (CVE-2020-8694) unless the node allows it
        return f"the CPU energy counters in {powercap_dir} can be read by root only"
    except FileNotFoundError:
        return f"no CPU energy counter (powercap/RAPL) in {powercap_dir}"
    except (OSError, ValueError) as err:
        return f"the CPU energy counters in {powercap_dir} cannot be read ({type(err).__name__}: {err})"
    return None


def check_meter(cfg: dict[str, Any], on_gpu: bool) -> tuple[tuple[str, ...], str | None]:
    """Which meters this run reads ('nvml', 'rapl') and, for what it leaves out, why. ``auto`` reads NVML for the
    GPUs of a GPU run and the CPU packages' powercap counters of every run, each where it can be read. A meter
    named on purpose (``nvml``, ``rapl``, ``nvml+rapl``) that this machine cannot read is an error, raised before
    training starts."""
    meter = cfg["meter"]
    if meter == "none":
        return (), "energy.meter=none"
    if meter == "auto":
        wanted, strict = (("nvml", "rapl") if on_gpu else ("rapl",)), False
    else:
        wanted, strict = tuple(meter.split("+")), True
        if "nvml" in wanted and not on_gpu:
            raise ConfigError(f"config key 'energy.meter': '{meter}' reads the GPUs a run trains on, but this run "
                              f"trains on the CPU; valid here: auto, rapl, none")
    meters, missing = [], []
    for name in wanted:
        reason = nvml_available() if name == "nvml" else rapl_available(cfg["powercap_dir"])
        if reason is None:
            meters.append(name)
        elif strict:
            raise ConfigError(f"config key 'energy.meter': '{meter}' cannot be read on {node_name()}: {reason}; "
                              f"valid: auto (measures where it can), none")
        else:
            missing.append(reason)
    if missing:
        log.info("energy: not counted: %s", "; ".join(missing))
    return tuple(meters), "; ".join(missing) or None


class EnergyLedger:
    """This process's share of a run's energy: reads its counter from ``start()`` to ``stop()``, and keeps the
    joules so far in its own file under ``<run>/energy``, rewritten every ``sample_every_s`` seconds."""

    def __init__(self, counter, folder: Path, rank: int, sample_every_s: float):
        self.counter = counter
        self.folder = Path(folder)
        self.sample_every_s = sample_every_s
        started = time.strftime("%Y%m%dT%H%M%S")
        self.path = self.folder / f"{started}-{node_name()}-{os.getpid()}-rank{rank}-{counter.kind}.json"
        self.record = {"meter": counter.kind, "devices": counter.devices, "host": node_name(), "rank": rank,
                       "slurm_job_id": slurm_env.job_id(), "started": time.time(),
                       "joules": 0.0, "seconds": 0.0}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._write_lock = threading.Lock()

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._start_joules = self.counter.read()
        self._start_time = time.monotonic()
        self.sample()
        self._thread = threading.Thread(target=self._run, name="aift-energy", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.sample_every_s):
            try:
                self.sample()
            except Exception as err:  # noqa: BLE001 - a failed read must not end training; the next one may work
                log.warning("energy: reading %s failed: %s", self.counter.kind, err)

    def sample(self) -> None:
        with self._write_lock:
            self.record["joules"] = self.counter.read() - self._start_joules
            self.record["seconds"] = time.monotonic() - self._start_time
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.record, indent=1) + "\n")
            tmp.replace(self.path)  # a reader never sees half a file

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        try:
            self.sample()
        except Exception as err:  # noqa: BLE001 - the training is done; its file keeps the last good sample
            log.warning("energy: the last reading of %s failed (%s); %s keeps the one before", self.counter.kind, err,
                        self.path)


@dataclass
class MeterTotal:
    """One meter's part of a run's energy."""

    joules: float = 0.0
    seconds: float = 0.0  # measured seconds, summed over the files (device-seconds for NVML)
    files: int = 0
    devices: set = field(default_factory=set)  # (host, counter) pairs

    def as_dict(self) -> dict[str, Any]:
        return {"joules": round(self.joules, 3), "kwh": self.joules / JOULES_PER_KWH,
                "mean_watts": round(self.joules / self.seconds, 3) if self.seconds else None,
                "files": self.files, "devices": len(self.devices)}


@dataclass
class RunEnergy:
    """The sum of a run's energy files."""

    by_meter: dict[str, MeterTotal]
    segments: int  # job starts that measured: those of global rank 0 (a resume or requeue adds one)
    skipped: list[str]  # files that could not be read
    unmeasured: list[str]  # processes whose counter could not be opened, and why

    def as_dict(self) -> dict[str, Any]:
        if not self.by_meter:
            return {"measured": False, "meter": None,
                    "reason": "no counter could be read: " + "; ".join(self.unmeasured or self.skipped)}
        joules = sum(t.joules for t in self.by_meter.values())
        seconds = sum(t.seconds for t in self.by_meter.values())
        return {"measured": True, "meter": "+".join(sorted(self.by_meter)), "joules": round(joules, 3),
                "kwh": joules / JOULES_PER_KWH, "mean_watts": round(joules / seconds, 3) if seconds else None,
                "files": sum(t.files for t in self.by_meter.values()),
                "devices": sum(len(t.devices) for t in self.by_meter.values()), "segments": self.segments,
                "by_meter": {name: total.as_dict() for name, total in sorted(self.by_meter.items())},
                "unreadable_files": self.skipped, "unmeasured": self.unmeasured}


def record_failure(folder: Path, meter: str, rank: int, err: Exception) -> None:
    """This process could not open its counter: say so in the run's energy files, so the total is known to
    leave it out."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{time.strftime('%Y%m%dT%H%M%S')}-{node_name()}-{os.getpid()}-rank{rank}-{meter}.json"
    path.write_text(json.dumps({"meter": meter, "host": node_name(), "rank": rank,
                                "error": f"{type(err).__name__}: {err}"}, indent=1) + "\n")


def read_run_energy(run_dir: Path) -> RunEnergy | None:
    """Sum ``<run>/energy/*.json``. None when the run has no energy files. A file that cannot be read, and a
    process that could not open its counter, are listed (with a warning for the first) rather than failing the
    run: the total is then a lower bound, and says so."""
    folder = Path(run_dir) / ENERGY_DIR
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        return None
    by_meter: dict[str, MeterTotal] = {}
    segments, skipped, unmeasured = set(), [], []
    for path in files:
        try:
            record = json.loads(path.read_text())
            if "error" in record:
                unmeasured.append(f"{record.get('host')} rank {record.get('rank')} {record.get('meter')}: "
                                  f"{record['error']}")
                continue
            joules, seconds = float(record["joules"]), float(record["seconds"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("energy: %s is unreadable (%s); the run's total leaves it out", path, err)
            skipped.append(path.name)
            continue
        total = by_meter.setdefault(str(record.get("meter")), MeterTotal())
        total.joules += joules
        total.seconds += seconds
        total.files += 1
        total.devices.update((record.get("host"), d) for d in record.get("devices", []))
        if record.get("rank") == 0:
            segments.add(path.name.rsplit("-rank", 1)[0])  # <start>-<host>-<pid>: one per job start
    return RunEnergy(by_meter, len(segments), skipped, unmeasured)


def open_ledger(meter: str | None, cfg: dict[str, Any], run_dir: Path, trainer) -> EnergyLedger | None:
    """This process's ledger, or None where it measures nothing (no meter; a CPU run's ranks other than each
    node's first, whose package counter that rank already reads)."""
    if meter is None:
        return None
    if meter == "rapl":
        if trainer.local_rank != 0:
            return None
        counter = RaplCounter(cfg["powercap_dir"])
    else:
        device = trainer.strategy.root_device
        counter = NvmlCounter(cuda_uuid(device.index if device.index is not None else 0))
    return EnergyLedger(counter, Path(run_dir) / ENERGY_DIR, trainer.global_rank, cfg["sample_every_s"])


def set_aside_earlier_energy(run_dir: Path) -> Path | None:
    """A fresh start (no checkpoint) in a folder that already has energy files, from a run that folder held
    before: move them to ``energy.before-<time>`` (kept, not counted), so this run's total is its own."""
    folder = Path(run_dir) / ENERGY_DIR
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    aside = folder.with_name(f"{ENERGY_DIR}.before-{time.strftime('%Y%m%dT%H%M%S')}")
    folder.rename(aside)
    log.warning("energy: %s held the energy of an earlier run in this folder; moved to %s (this run starts fresh)",
                folder, aside)
    return aside


def summarize(run_dir: Path, reason: str | None) -> dict[str, Any]:
    """The ``energy`` entry of summary.json: the run's total so far, or why nothing was measured; ``not_counted``
    says why a counter ``auto`` wanted was left out (a GPU run's CPU packages where only root reads them)."""
    total = read_run_energy(run_dir)
    if total is None:
        return {"measured": False, "meter": None, "reason": reason or "no energy counter was read in this run"}
    summary = total.as_dict()
    if summary["measured"]:
        summary["not_counted"] = reason
    return summary
