"""Checkpoint lookups shared by train (resume) and eval."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aifactory_train.errors import CheckpointError

CHECKPOINT_DIR = "checkpoints"


def resolve_checkpoint(ckpt_path: str | None, run_dir: Path) -> str | None:
    """``None`` → start fresh; ``last`` → this run folder's last.ckpt; else an existing file."""
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "last":
        last = run_dir / CHECKPOINT_DIR / "last.ckpt"
        if not last.is_file():
            raise CheckpointError(
                f"ckpt_path=last: no checkpoint at '{last}'. To resume a run, pass its folder as well: "
                f"hydra.run.dir=<that run's folder> ckpt_path=last (or give ckpt_path=<file>)"
            )
        return str(last)
    path = Path(ckpt_path)
    if not path.is_file():
        raise CheckpointError(f"ckpt_path: checkpoint '{path}' does not exist")
    return str(path)


def read_hyperparameters(path: str) -> dict[str, Any]:
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - corrupt or foreign file
        raise CheckpointError(f"ckpt_path: '{path}' is not a readable Lightning checkpoint: {err}") from None
    return checkpoint.get("hyper_parameters", {})


def check_data_matches(path: str, data_info: dict[str, Any]) -> None:
    """A checkpoint trained on another class set (or with another tokenizer) cannot be resumed or scored here."""
    if "class_names" in data_info:
        check_classes_match(path, data_info["class_names"])
        return
    saved = read_hyperparameters(path).get("data_info", {})
    for key in ("tokenizer_sha256",):
        if key in data_info and saved.get(key) != data_info[key]:
            raise CheckpointError(f"ckpt_path: '{path}' was trained with another tokenizer ({key} {saved.get(key)} vs "
                                  f"{data_info[key]} here); resume or evaluate with the tokenizer stored in it")


def check_classes_match(path: str, class_names: list[str]) -> None:
    """A checkpoint trained on another class set cannot be resumed or scored on this data."""
    saved = read_hyperparameters(path).get("data_info", {}).get("class_names")
    if saved is None:
        raise CheckpointError(f"ckpt_path: '{path}' has no data_info.class_names; it was not written by an aift recipe")
    if list(saved) != list(class_names):
        raise CheckpointError(
            f"ckpt_path: '{path}' was trained on {len(saved)} classes {list(saved)}, but the data has "
            f"{len(class_names)} classes {list(class_names)}; use a checkpoint of this class set, or start "
            f"from its weights with model.weights_path instead"
        )
