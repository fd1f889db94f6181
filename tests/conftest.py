"""Shared fixtures: synthetic datasets written as real files, and a runner for the `aift` CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def aift(*args: str, cwd: Path, env: dict | None = None, timeout: int = 1500) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (as a user would), with a clean MLflow environment."""
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("MLFLOW_", "AIFT_")) or k == "AIFT_CACHE_DIR"}
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "aifactory_train.cli", *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


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
def data_roots(plastic_data, crop_data, clinical_data) -> dict:
    return {"plastic_sorting": plastic_data, "crop_detection": crop_data, "clinical_notes": clinical_data}


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
