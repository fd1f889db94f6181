"""Checkpoint lookups shared by train (resume) and eval."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aifactory_train.errors import CheckpointError

CHECKPOINT_DIR = "checkpoints"
# inside a DeepSpeed checkpoint folder, the file with Lightning's state (hparams, loops): ZeRO-1/2, then ZeRO-3
DEEPSPEED_STATES = ("checkpoint/mp_rank_00_model_states.pt", "checkpoint/zero_pp_rank_0_mp_rank_00_model_states.pt")


def deepspeed_state(path: Path) -> Path | None:
    for name in DEEPSPEED_STATES:
        if (path / name).is_file():
            return path / name
    return None


def is_checkpoint(path: Path) -> bool:
    """A Lightning checkpoint file, or the folder DeepSpeed writes under the same name."""
    return path.is_file() or deepspeed_state(path) is not None


def resolve_checkpoint(ckpt_path: str | None, run_dir: Path) -> str | None:
    """``None`` → start fresh; ``last`` → this run folder's last.ckpt; ``auto`` → the newest checkpoint in this
    run folder if any (requeue/restart), else fresh; else an existing file (or DeepSpeed folder)."""
    if ckpt_path in (None, "", "null"):
        return None
    if ckpt_path == "auto":
        return find_resume_checkpoint(run_dir)
    if ckpt_path == "last":
        last = run_dir / CHECKPOINT_DIR / "last.ckpt"
        if not is_checkpoint(last):
            raise CheckpointError(
                f"ckpt_path=last: no checkpoint at '{last}'. To resume a run, pass its folder as well: "
                f"hydra.run.dir=<that run's folder> ckpt_path=last (or give ckpt_path=<file>)"
            )
        return str(last)
    path = Path(ckpt_path)
    if not is_checkpoint(path):
        raise CheckpointError(f"ckpt_path: checkpoint '{path}' does not exist")
    return str(path)


def load_checkpoint_state(path: str) -> dict[str, Any]:
    """A checkpoint's dict (hyper_parameters, loops, what modules add), also from a DeepSpeed folder, where it
    sits beside the sharded tensors."""
    import torch

    if Path(path).is_dir():
        path = str(deepspeed_state(Path(path)))
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - corrupt or foreign file
        raise CheckpointError(f"ckpt_path: '{path}' is not a readable Lightning checkpoint: {err}") from None


def read_hyperparameters(path: str) -> dict[str, Any]:
    return load_checkpoint_state(path).get("hyper_parameters", {})


def check_checkpoint_task(path: str, recipe: dict[str, Any]) -> None:
    """A checkpoint of another task (a classifier given to the detection recipe) is refused by name, before the
    recipe's module fails on keys it does not know. What made it: the model's ``task`` in its hyperparameters and
    the recipe in its provenance record (mmap: the tensors are not read)."""
    state = load_checkpoint_state(path)
    task = (state.get("hyper_parameters", {}).get("model") or {}).get("task")
    made_by = ((state.get("callbacks") or {}).get("aift_provenance") or {}).get("recipe")
    if task is not None and recipe.get("task") not in (None, task):
        raise CheckpointError(
            f"ckpt_path '{path}' holds a model of task {task}" + (f" (made by recipe {made_by})" if made_by else "") +
            f"; recipe {recipe.get('name')} needs one of task {recipe.get('task')}: pass one of its own runs' "
            f"checkpoints" + (f", or use recipe={made_by}" if made_by else ""))


# model keys that only say where a fresh model's first weights come from; they shape nothing
STARTING_WEIGHTS_KEYS = ("weights_path", "backbone_weights_path")


def load_trained_module(module_class, path: str):
    """The recipe's LightningModule with a checkpoint's trained weights, for eval and export.

    Rebuilding it from the saved hyperparameters would read ``model.weights_path`` or
    ``model.backbone_weights_path`` (the weights training started from) again, only to overwrite them: an eval
    on another machine, or after the pretrained file moved, failed on a file it does not need. Those keys are
    cleared; every key that shapes the model is kept."""
    if Path(path).is_dir():
        raise CheckpointError(f"ckpt_path: '{path}' is a DeepSpeed checkpoint folder; gather it into one file first "
                              f"with `aift checkpoint consolidate {path}` and pass that file")
    model = read_hyperparameters(path).get("model")
    overrides = {}
    if isinstance(model, dict) and any(model.get(k) for k in STARTING_WEIGHTS_KEYS):
        overrides["model"] = {**model, **{k: None for k in STARTING_WEIGHTS_KEYS if k in model}}
    try:
        return module_class.load_from_checkpoint(path, map_location="cpu", weights_only=True, **overrides)
    except CheckpointError as err:  # a module's on_load_checkpoint refused what the file holds: name the file
        raise CheckpointError(f"ckpt_path '{path}': {err}") from None


def check_data_matches(path: str, data_info: dict[str, Any], keys: tuple[str, ...]) -> None:
    """A checkpoint trained on other data than this (another class set, another tokenizer) cannot be resumed or
    scored here. ``keys``: the ``data_info`` entries that must agree, as the recipe's DataModule declares them
    (``MATCH_ON_RESUME``)."""
    saved = read_hyperparameters(path).get("data_info", {})
    for key in keys:
        if key == "class_names" and key in data_info:
            check_classes_match(path, data_info["class_names"])
        elif key in data_info and saved.get(key) != data_info[key]:
            raise CheckpointError(f"ckpt_path: '{path}' was trained with data_info.{key} {saved.get(key)!r}, but "
                                  f"the data here has {data_info[key]!r}; resume or evaluate with what is stored in "
                                  f"that checkpoint, or start from its weights")


def saved_world_size(path: str) -> int | None:
    """How many ranks wrote a checkpoint: DeepSpeed's optimizer shards, else the per-rank RNG states that
    ``RNGStateCallback`` keeps (None for a checkpoint without them)."""
    folder = Path(path)
    if folder.is_dir():
        shards = list((folder / "checkpoint").glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))
        if shards:
            return len(shards)
    ranks = load_checkpoint_state(path).get("callbacks", {}).get("RNGStateCallback", {}).get("ranks")
    return len(ranks) if ranks else None


def check_world_size(path: str, world_size: int, batch: dict | None = None) -> str | None:
    """A DeepSpeed checkpoint resumes only with the number of ranks that wrote it (its optimizer state is
    partitioned per rank): refuse another count before any GPU time is spent. A Lightning checkpoint (single,
    DDP, FSDP full state) loads with any count (``ResumableSampler`` finishes the interrupted epoch's data on the
    new ranks); the returned warning says what then does not continue exactly. ``batch``: ``train.batch_plan``."""
    saved = saved_world_size(path)
    if saved is None or saved == world_size:
        return None
    if Path(path).is_dir():
        raise CheckpointError(
            f"ckpt_path: '{path}' is a DeepSpeed checkpoint written by {saved} ranks, but this job has {world_size} "
            f"(trainer.num_nodes x trainer.devices); resume it with {saved} ranks, or take its weights with "
            f"`aift checkpoint consolidate {path}` and start a new run from them")
    if batch and batch.get("global_fixed"):
        global_batch = (f"the global batch stays {batch['global']} samples per step (trainer.global_batch_size; "
                        f"{batch['accumulate_grad_batches']} batches accumulated per step now)")
    else:
        global_batch = ("the global batch (samples per step) changes with the rank count (set "
                        "trainer.global_batch_size to keep it)")
    return (f"resuming '{path}', written by {saved} ranks, with {world_size}: weights, optimizer, step and the "
            f"interrupted epoch's data continue (its remaining samples, each once, split over the new ranks) and the "
            f"learning-rate schedule is stretched to end with the run; {global_batch}; the random streams "
            f"(dropout, augmentation) do not continue exactly; resume with {saved} ranks for that")


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


# -- DeepSpeed folders: nothing in them may run code ----------------------------------------------------------
# DeepSpeed and Lightning unpickle a ZeRO folder's shards with torch.load(weights_only=False), which runs whatever a
# crafted pickle asks for. Before they touch a folder, every file they would unpickle must load with
# weights_only=True, whose unpickler builds only tensors, builtin containers and the globals allowed here (so a file
# that passes cannot run code). The allowlist is what real ZeRO-1/2/3 checkpoints (fp32, bf16) hold besides those,
# found by saving them on CPU and seeing what the weights_only unpickler refused; each is plain data:
def deepspeed_safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [
        ZeroStageEnum,  # optimizer_state_dict["zero_stage"], an int Enum (consolidation reads it)
        LossScaler,  # optimizer_state_dict["loss_scaler"] of fp32/bf16 runs: the static scale, numbers only
        DynamicLossScaler,  # its place in precision=16-mixed runs (GPU only, so not seen on CPU): numbers only
        fragment_address,  # ZeRO-1/2 param_slice_mappings: a dataclass of two ints (numel, start) per parameter
    ]


TRUST_CONSOLIDATE = "--trust-checkpoint"
TRUST_RESUME = "checkpoint.trust=true"
MAX_TAG_BYTES = 256  # `latest` holds one tag name, e.g. "checkpoint" or "global_step120"


def _deepspeed_tag_folder(folder: Path, shown: str) -> Path:
    """The tag folder that ``latest`` names (what DeepSpeed loads), refused unless it is a folder inside ``folder``:
    a tag such as ``../../elsewhere`` would make DeepSpeed read shards from outside the checkpoint."""
    latest = folder / "latest"
    if not latest.is_file():
        raise CheckpointError(f"'{shown}' is not a DeepSpeed checkpoint folder: it has no 'latest' file naming its "
                              f"tag folder")
    raw = latest.read_bytes()[: MAX_TAG_BYTES + 1]
    tag = raw.decode("utf-8", errors="replace").strip()
    if len(raw) > MAX_TAG_BYTES or not tag or tag in (".", "..") or "/" in tag or "\\" in tag:
        raise CheckpointError(f"'{shown}': its 'latest' file names the tag {tag[:80]!r}; valid: the name of a folder "
                              f"inside the checkpoint (e.g. 'checkpoint')")
    tag_folder = (folder / tag).resolve()
    if not tag_folder.is_relative_to(folder.resolve()) or not tag_folder.is_dir():
        raise CheckpointError(f"'{shown}': its 'latest' file names the tag {tag!r}, which is not a folder inside the "
                              f"checkpoint")
    return tag_folder


def _refusal(err: Exception) -> str:
    """Why a file did not load with weights_only=True, in one line: the global it needs, else torch's reason."""
    import re

    text = str(err)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return (f"it needs the global {found.group(1)}, which is not on the allowlist of DeepSpeed's data types; "
                f"unpickled with weights_only=False, as DeepSpeed does, it could run code")
    if "Weights only load failed" in text:
        after = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
        return (f"the weights-only unpickler refused it ({(after or ['?'])[0][:200]}): it is damaged, or holds more "
                f"than data")
    first = ([line for line in text.splitlines() if line.strip()] or [type(err).__name__])[0].strip()[:200]
    return f"it is not a readable torch file ({type(err).__name__}: {first})"


def verify_deepspeed_checkpoint(path: str, trust: bool, trust_option: str) -> list[str]:
    """Check a DeepSpeed checkpoint folder before DeepSpeed or Lightning unpickle it (see the allowlist above).

    A file that does not pass is refused with a CheckpointError naming it, the global and ``trust_option``; with
    ``trust`` the folder is let through and the returned lines say which files were loaded unverified (the caller
    records them). The tag folder must be inside the checkpoint, with or without ``trust``."""
    import torch

    folder = Path(path)
    tag_folder = _deepspeed_tag_folder(folder, path)
    root = folder.resolve()
    files = sorted(p for p in tag_folder.rglob("*.pt") if p.is_file())
    if not files:
        raise CheckpointError(f"'{path}' is not a DeepSpeed checkpoint folder: its tag folder '{tag_folder.name}' "
                              f"holds no .pt shards")
    unverified = []
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        for file in files:
            shown = f"{path}/{file.relative_to(root) if file.is_relative_to(root) else file}"
            if not file.resolve().is_relative_to(root):
                raise CheckpointError(f"'{shown}' links to '{file.resolve()}', outside the checkpoint folder; refused")
            try:
                try:  # mmap: the check reads the pickle, not the tensors' bytes
                    torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as err:
                    if "mmap" not in str(err):
                        raise
                    torch.load(file, map_location="cpu", weights_only=True)  # the legacy (non-zip) format
            except Exception as err:  # noqa: BLE001 - any failure means: not provably data only
                reason = f"'{shown}' did not pass the weights-only check: {_refusal(err)}"
                if not trust:
                    raise CheckpointError(f"refused to load DeepSpeed checkpoint '{path}': {reason}. Only if you made "
                                          f"this checkpoint or trust who did, pass {trust_option}") from None
                unverified.append(reason)
    return unverified


def consolidate(checkpoint_dir: str, output: str | None = None, trust: bool = False) -> tuple[Path, list[str]]:
    """A DeepSpeed (ZeRO) checkpoint folder -> one fp32 Lightning checkpoint file that `aift eval`, `aift export`
    and ``load_from_checkpoint`` read on any number of devices. The folder is left as it is. Returns the file and
    the files loaded unverified (``trust``; see ``verify_deepspeed_checkpoint``)."""
    source = Path(checkpoint_dir)
    if source.is_file():
        raise CheckpointError(f"'{source}' is already a single checkpoint file; only DeepSpeed checkpoint folders "
                              f"need consolidating")
    if not source.is_dir():
        raise CheckpointError(f"'{source}' does not exist; give a DeepSpeed checkpoint folder, e.g. "
                              f"outputs/<run>/checkpoints/last.ckpt")
    if deepspeed_state(source) is None:
        raise CheckpointError(f"'{source}' is not a DeepSpeed checkpoint folder (no {' or '.join(DEEPSPEED_STATES)} "
                              f"in it)")
    target = Path(output) if output else source.with_name(source.name.removesuffix(".ckpt") + "-consolidated.ckpt")
    if target.exists():
        raise CheckpointError(f"--out '{target}' exists; choose another path (nothing was overwritten)")
    unverified = verify_deepspeed_checkpoint(str(source), trust, TRUST_CONSOLIDATE)
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    partial = target.with_name(target.name + ".partial")
    try:
        convert_zero_checkpoint_to_fp32_state_dict(str(source), str(partial))
    except (OSError, ValueError, KeyError, IndexError, TypeError, RuntimeError) as err:  # incomplete or foreign
        partial.unlink(missing_ok=True)
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"'{source}' could not be consolidated as a DeepSpeed ZeRO checkpoint: {first}") from None
    partial.replace(target)  # a reader never sees half a file
    return target, unverified


def find_resume_checkpoint(run_dir: Path) -> str | None:
    """The checkpoint a requeued or restarted job should continue from, or None for a fresh start."""
    candidates = [p for p in run_dir.glob("hpc_ckpt_*.ckpt") if is_checkpoint(p)]
    last = run_dir / CHECKPOINT_DIR / "last.ckpt"
    if is_checkpoint(last):
        candidates.append(last)
    if not candidates:
        return None
    # the furthest step wins; not the newest file: a DeepSpeed checkpoint is a folder whose own mtime stays at its
    # creation while it is rewritten
    def progress(path: Path) -> tuple[int, float]:
        return int(load_checkpoint_state(str(path)).get("global_step", -1)), path.stat().st_mtime

    return str(max(candidates, key=progress))
