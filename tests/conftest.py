"""Shared fixtures: synthetic datasets written as real files, and a runner for the `aift` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def aift(*args: str, cwd: Path, env: dict | None = None, timeout: int = 1500,
         fresh: bool = False) -> subprocess.CompletedProcess:
    """Run the real CLI in a process of its own (as a user would), with a clean MLflow environment: forked from this
    worker's pre-imported `aift` (tests/aift_zygote.py: the same code, without ~10 s of imports per command), or,
    with ``fresh=True`` or AIFT_TEST_FORK=0, started as ``python -m aifactory_train.commands.cli``."""
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("MLFLOW_", "AIFT_")) or k == "AIFT_CACHE_DIR"}
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env.update(env or {})
    if fresh or os.environ.get("AIFT_TEST_FORK") == "0":
        return subprocess.run(
            [sys.executable, "-m", "aifactory_train.commands.cli", *args],
            cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
        )
    return _ZYGOTE.run(list(args), Path(cwd), full_env, timeout)


class _Zygote:
    """This worker's tests/aift_zygote.py process, started on first use; one command at a time."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.lock = threading.Lock()
        self.count = 0

    def _start(self) -> subprocess.Popen:
        if self.process is None or self.process.poll() is not None:
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            self.process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("aift_zygote.py"))],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
                                            bufsize=1)
            ready = self.process.stdout.readline()
            if not ready.startswith('{"ready"'):
                raise RuntimeError(f"tests/aift_zygote.py did not start: {ready!r}")
        return self.process

    def _answer(self, deadline: float | None) -> dict:
        import select
        import time

        zygote = self.process
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([zygote.stdout], [], [], wait)
            if not ready:
                raise TimeoutError
            line = zygote.stdout.readline()
            if not line:
                raise RuntimeError("tests/aift_zygote.py ended")
            return json.loads(line)

    def run(self, args: list[str], cwd: Path, env: dict, timeout: int) -> subprocess.CompletedProcess:
        import signal
        import tempfile
        import time

        with self.lock, tempfile.TemporaryDirectory(prefix="aift-out-") as folder:
            zygote = self._start()
            self.count += 1
            out, err = Path(folder) / "stdout", Path(folder) / "stderr"
            request = {"id": self.count, "args": args, "cwd": str(cwd), "env": env, "stdout": str(out),
                       "stderr": str(err)}
            zygote.stdin.write(json.dumps(request) + "\n")
            zygote.stdin.flush()
            pid = self._answer(None)["pid"]
            try:
                status = self._answer(time.monotonic() + timeout)["status"]
            except TimeoutError:
                os.killpg(pid, signal.SIGKILL)
                self._answer(None)
                raise subprocess.TimeoutExpired(["aift", *args], timeout, out.read_text(errors="replace"),
                                                err.read_text(errors="replace")) from None
            return subprocess.CompletedProcess(["aift", *args], os.waitstatus_to_exitcode(status),
                                               out.read_text(errors="replace"), err.read_text(errors="replace"))


_ZYGOTE = _Zygote()


@pytest.fixture(scope="session", autouse=True)
def _private_cache_dir(tmp_path_factory):
    """Data-digest caches of the tests' runs go to a temporary folder, not the user's ~/.cache."""
    os.environ["AIFT_CACHE_DIR"] = str(tmp_path_factory.mktemp("aift-cache"))


@pytest.fixture(scope="session")
def plastic_data(tmp_path_factory) -> Path:
    """A small RGB plastic_sorting dataset (70 train, 18 val, 18 test PNGs). Read-only for tests."""
    from aifactory_train.recipes.plastic_sorting.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("data") / "plastic", size=70, seed=1)


@pytest.fixture(scope="session")
def plastic_data_ms(tmp_path_factory) -> Path:
    """A small multispectral (R, G, B, NIR as .npy) plastic_sorting dataset."""
    from aifactory_train.recipes.plastic_sorting.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("data") / "plastic_ms", size=35, seed=2, variant="multispectral")


@pytest.fixture
def data_copy(plastic_data, tmp_path) -> Path:
    """A private copy of the RGB dataset that a test may damage."""
    import shutil

    return Path(shutil.copytree(plastic_data, tmp_path / "plastic"))


@pytest.fixture(scope="session")
def crop_data(tmp_path_factory) -> Path:
    """A small crop_detection dataset: 24 train, 6 val, 6 test JPEGs with COCO JSON (ids 3=crop, 7=weed)."""
    from aifactory_train.recipes.crop_detection.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("data") / "crops", size=24, seed=4)


@pytest.fixture
def crop_copy(crop_data, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(crop_data, tmp_path / "crops"))


@pytest.fixture(scope="session")
def data_roots(plastic_data, crop_data, clinical_data, energy_data, seg_data) -> dict:
    return {"plastic_sorting": plastic_data, "crop_detection": crop_data, "clinical_notes": clinical_data,
            "energy_forecasting": energy_data, "infrastructure_segmentation": seg_data}


@pytest.fixture(scope="session")
def energy_data(tmp_path_factory) -> Path:
    """Two households (load + PV), hourly, 1 March to 9 May 2026 (the 23-hour day of 29 March inside). Read-only."""
    from aifactory_train.recipes.energy_forecasting.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("data") / "energy", size=2, seed=3, days=70, start="2026-03-01")


@pytest.fixture(scope="session")
def seg_data(tmp_path_factory) -> Path:
    """A small synthetic orthophoto (EPSG:28992) in all three infrastructure_segmentation layouts: a 256 px train
    raster, 128 px val and test rasters, their label rasters, polygons and PNG tiles. Read-only for tests."""
    from aifactory_train.recipes.infrastructure_segmentation.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("data") / "ortho", size=256, seed=3)


@pytest.fixture(scope="session")
def clinical_raw(tmp_path_factory) -> Path:
    """Raw clinical_notes JSONL (invented identifiers; not de-identified): 120 train, 18 val, 18 test notes."""
    from aifactory_train.recipes.clinical_notes.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("data") / "notes_raw", size=120, seed=5)


@pytest.fixture(scope="session")
def clinical_data(clinical_raw, tmp_path_factory) -> Path:
    """The same notes after the real de-identification step (deduce). Read-only for tests."""
    from aifactory_train.recipes.clinical_notes.deidentify import deidentify_dataset

    out = tmp_path_factory.mktemp("data") / "notes"
    data = {"root": str(clinical_raw), "text_field": "note", "target_field": "summary",
            "splits": {"train": "train.jsonl", "val": "val.jsonl", "test": "test.jsonl"}}
    deidentify_dataset(data, out)
    return out


@pytest.fixture(scope="session")
def pretrained_lm(clinical_data, tmp_path_factory) -> Path:
    """A tiny causal LM saved with save_pretrained (config.json, safetensors, tokenizer), as a hospital would
    keep a pretrained model on local disk."""
    from transformers import AutoModelForCausalLM

    from aifactory_train.recipes.clinical_notes.data import read_jsonl, train_tokenizer
    from aifactory_train.recipes.clinical_notes.model import llama_config

    records = read_jsonl(clinical_data / "train.jsonl", "train", "note", "summary")
    tokenizer = train_tokenizer([text for _, note, summary in records for text in (note, summary)], 512)
    info = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    sizes = {"hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
             "max_position_embeddings": 512, "vocab_size": None}
    out = tmp_path_factory.mktemp("models") / "tiny_lm"
    AutoModelForCausalLM.from_config(llama_config(sizes, info)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


class PowercapFiles:
    """The kernel's powercap files for one CPU package (``intel-rapl:0``), kept counting by a thread at ``watts``.

    This machine has no readable RAPL counter, so the tests stand in for the kernel: the files have its layout
    and wrap-around, and the runs read them through ``energy.powercap_dir``, exactly as they read /sys. The
    counter is a pure function of time (joules = watts x seconds since start), so a run's reads can be checked
    against the time it measured. It starts 1 J below the wrap, so every run crosses a wrap-around."""

    RANGE_UJ = 262_143_328_850

    def __init__(self, root: Path, watts: float):
        self.root, self.watts = root, watts
        self.zone = root / "intel-rapl:0"
        (root / "intel-rapl:0:0").mkdir(parents=True)  # a sub-zone (cores), which must not be added again
        (root / "intel-rapl:0:0" / "energy_uj").write_text("0\n")
        (root / "intel-rapl:0:0" / "max_energy_range_uj").write_text(f"{self.RANGE_UJ}\n")
        self.zone.mkdir(exist_ok=True)
        (self.zone / "name").write_text("package-0\n")
        (self.zone / "max_energy_range_uj").write_text(f"{self.RANGE_UJ}\n")
        self._start_uj = self.RANGE_UJ - 1_000_000
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._write()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _write(self) -> None:
        uj = int(self._start_uj + self.watts * (time.monotonic() - self._t0) * 1e6) % (self.RANGE_UJ + 1)
        tmp = self.zone / "energy_uj.tmp"
        tmp.write_text(f"{uj}\n")
        tmp.replace(self.zone / "energy_uj")

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self._write()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def powercap(tmp_path_factory):
    files = PowercapFiles(tmp_path_factory.mktemp("powercap"), watts=50.0)
    yield files
    files.close()


# `make test` runs two files at a time (xdist --dist loadfile), handing out files in collection order. Alphabetical
# order put the longest files (test_resume, test_slurm, test_strategies, test_train_e2e: minutes each) last, so
# one worker ran them alone at the end. Longest first (largest-processing-time-first scheduling) keeps both busy.
LONGEST_FIRST = ["test_resume.py", "test_crop_detection.py", "test_slurm.py", "test_clinical_notes.py",
                 "test_train_e2e.py", "test_strategies.py", "test_checkpoint_safety.py", "test_bench.py",
                 "test_usage_terms.py", "test_data_check.py", "test_mlflow_server.py", "test_energy.py"]


# Two tiers (`make test-fast`: not e2e; `make test`: all). A test is end-to-end when it is marked so, uses a fixture
# that trains, serves or builds something (a run, a de-identified corpus, an MLflow server, a wheel), or starts a
# process itself (`aift`, a subprocess, a Slurm job) or a Trainer: what takes seconds to minutes, not milliseconds.
E2E_FIXTURES = {"acceptance", "canary_raw", "clinical_data", "clinical_raw", "crop_run", "data_roots", "hf_root",
                "installed", "lora_run", "mlflow_server", "notes_checkpoint", "pretrained_lm", "runs", "smoke_run",
                "strategy_runs", "summariser", "tokenizer", "mobilenet_imagenet_file"}
E2E_CALLS = ("aift(", "subprocess", "Trainer(", "run_training(", ".fit(", "sbatch", "local_cluster", "Popen")


def _is_end_to_end(item) -> bool:
    import inspect

    if item.get_closest_marker("e2e") or E2E_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    function = getattr(item, "function", None)
    try:
        source = inspect.getsource(function) if function is not None else ""
    except (OSError, TypeError):
        return True
    return any(call in source for call in E2E_CALLS)


def pytest_collection_modifyitems(items):
    for item in items:
        if _is_end_to_end(item) and not item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.e2e)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(rank)))  # stable: in-file order kept


def write_hf_detection_layout(crop_data: Path, root: Path, splits=("train", "val")) -> Path:
    """The synthetic COCO crop data rewritten in the Hugging Face object-detection layout (<split>/metadata.jsonl
    with objects: {bbox, category}; crop = 0, weed = 1)."""
    import json
    import shutil

    for split in splits:
        (root / split).mkdir(parents=True)
        raw = json.loads((crop_data / "annotations" / f"{split}.json").read_text())
        lines = []
        for img in raw["images"]:
            shutil.copy(crop_data / "images" / split / img["file_name"], root / split / img["file_name"])
            anns = [a for a in raw["annotations"] if a["image_id"] == img["id"]]
            lines.append({"file_name": img["file_name"], "objects": {
                "bbox": [a["bbox"] for a in anns], "category": [0 if a["category_id"] == 3 else 1 for a in anns]}})
        (root / split / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def runs_in(store: Path) -> int:
    """How many runs an MLflow sqlite store holds (0: no store, or no table yet)."""
    import sqlite3

    if not store.exists():
        return 0
    with sqlite3.connect(store) as db:
        tables = {row[0] for row in db.execute("select name from sqlite_master where type='table'")}
        return db.execute("select count(*) from runs").fetchone()[0] if "runs" in tables else 0


def assert_one_line_naming(message: str, pieces) -> None:
    """A reader's refusal: one line, holding every piece that names the culprit (file, record, field, value)."""
    assert "\n" not in message
    for piece in pieces:
        assert piece in message, (piece, message)
