"""`aift predict`: run a checkpoint on new files (no labels needed) and keep the results as files.

The recipe contract: the LightningModule has ``PREDICT_EXTENSIONS`` (the file kinds it reads) and
``predict_files(files, batch_size, options)``, which yields one JSON-able dict per file (per record, for files of
records such as clinical_notes' JSONL), preprocessing each as its eval split is preprocessed. ``options`` is the
``predict`` config plus ``output_dir`` (where the recipe may write results of its own, such as pictures, moved into
the run folder when every file was read) and ``input_root`` (the input folder, to name results by path).

Nothing goes to MLflow: the files may be a company's or a patient's, and the predictions stay in the output folder,
with ``predict.json`` saying which checkpoint (and which training data) made them.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator

PREDICTIONS_FILE = "predictions.jsonl"
REPORT_FILE = "predict.json"
STAGING_PREFIX = ".predict-"  # a private folder of results until every file was read
AUTOCAST_DTYPES = {"bf16-mixed": "bfloat16", "16-mixed": "float16"}


def input_files(path: str, extensions: tuple[str, ...]) -> list[Path]:
    """The files under ``path`` (a folder, searched recursively, in sorted order) or ``path`` itself."""
    from aifactory_train.errors import DataError

    kinds = ", ".join(extensions)
    root = Path(path)
    if not root.exists():
        raise DataError(f"config key 'input': '{path}' does not exist; give a folder of files ({kinds}) or one file")
    if root.is_file():
        if not root.name.lower().endswith(extensions):
            raise DataError(f"config key 'input': '{path}' is not a kind of file this recipe reads; valid: {kinds}")
        return [root]
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.name.lower().endswith(extensions))
    if not files:
        raise DataError(f"config key 'input': the folder '{path}' holds no files this recipe reads ({kinds})")
    return files


class _FileReads:
    """A map-style dataset of ``read(file)``: what DataLoader workers run. A file the reader refuses comes back as
    its message, so the main process raises the reader's DataError as it is (a worker's exception would arrive
    wrapped in the worker's traceback)."""

    def __init__(self, files: list[Path], read: Callable[[Path], Any]):
        self.files, self.read = files, read

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, str | None]:
        from aifactory_train.errors import DataError

        try:
            return self.read(self.files[index]), None
        except DataError as err:
            return None, str(err)


def read_in_batches(files: list[Path], read: Callable[[Path], Any], batch_size: int,
                    num_workers: int) -> Iterator[tuple[list[Path], list[Any]]]:
    """(files, what ``read`` made of each) per batch, in file order, read by ``num_workers`` DataLoader worker
    processes while the model works on the batch before (0: in this process). For recipes whose files take real
    work to decode (images); ``read`` must be picklable where workers are spawned (a module-level function, or a
    functools.partial of one)."""
    from torch.utils.data import DataLoader

    from aifactory_train.errors import DataError

    loader = DataLoader(_FileReads(files, read), batch_size=batch_size, num_workers=num_workers, collate_fn=list)
    for start, items in zip(range(0, len(files), batch_size), loader):
        for _, error in items:
            if error is not None:
                raise DataError(error)
        yield files[start:start + batch_size], [item for item, _ in items]


def earlier_outputs(run_dir: Path) -> set[str] | None:
    """What an earlier `aift predict` in this folder wrote, as its predict.json lists it (entries inside the folder
    only); an empty set where no earlier run left a report, and None where a ``predict.json`` is there but is not
    one of ours (a user's file of that name: neither it nor anything beside it may be replaced)."""
    report = run_dir / REPORT_FILE
    if not report.exists():
        return set()
    try:
        content = json.loads(report.read_text())
        listed = [content["predictions"], *content.get("outputs", [])]
    except (OSError, ValueError, AttributeError, TypeError, KeyError, UnicodeDecodeError):
        return None
    inside = run_dir.resolve()
    return {p for p in listed if isinstance(p, str) and Path(p).parent == inside}


def check_output_folder(run_dir: Path, input_path: Path) -> None:
    """Refuse an output folder that is, contains or lies inside the input: results written there would sit among the
    user's files (and replace some of them), or be read back as input by the next run."""
    from aifactory_train.errors import ConfigError

    out, source = run_dir.resolve(), input_path.resolve()
    source_folder = source if source.is_dir() else source.parent
    if out == source_folder or out in source.parents or source_folder in out.parents:
        raise ConfigError(
            f"config key 'hydra.run.dir': the output folder '{out}' is, contains or lies inside the input "
            f"'{source}'; valid: a folder apart from the input, e.g. hydra.run.dir=predictions/{source.stem}")


def check_replaceable(run_dir: Path, names: list[str], ours: set[str] | None) -> None:
    """Refuse, before anything is moved, to replace an entry of the output folder that no earlier `aift predict`
    listed as its own: the folder may hold the user's files (a ``pictures/`` folder of photos, say)."""
    from aifactory_train.errors import ConfigError

    taken = [name for name in names if (run_dir / name).exists() or (run_dir / name).is_symlink()]
    foreign = [name for name in taken if ours is None or str((run_dir / name).resolve()) not in ours]
    if foreign:
        why = (f"its '{REPORT_FILE}' is not an `aift predict` report" if ours is None
               else f"no earlier `aift predict` listed {'it' if len(foreign) == 1 else 'them'} in '{REPORT_FILE}'")
        raise ConfigError(
            f"config key 'hydra.run.dir': '{run_dir.resolve()}' already holds {', '.join(map(repr, foreign))}, which "
            f"this run would replace, and {why}; valid: an empty or new folder, or one an earlier `aift predict` wrote")


def datacard_root(path: Path) -> Path | None:
    """The folder of the nearest data card at or above ``path`` (resolved), whose fields describe these files; the
    owner's terms of it and of every card above it apply (usage_terms.datacards_for)."""
    from aifactory_train.usage_terms import datacards_for

    cards = datacards_for(path)
    return cards[0].parent if cards else None


def run_prediction(cfg) -> dict[str, Any]:
    started = time.time()
    from omegaconf import OmegaConf

    from aifactory_train.config import check, require_checkpoint, validate

    validate(cfg)
    require_checkpoint(cfg, "aift predict")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    options = resolved["predict"]
    check(isinstance(options.get("batch_size"), int) and options["batch_size"] >= 1, "predict.batch_size",
          options.get("batch_size"), "an integer >= 1")
    check(isinstance(options.get("num_workers"), int) and options["num_workers"] >= 0, "predict.num_workers",
          options.get("num_workers"), "an integer >= 0 (0: files are read in the main process)")
    threshold = options.get("score_threshold")
    check(threshold is None or (isinstance(threshold, (int, float)) and 0 <= threshold <= 1), "predict.score_threshold",
          threshold, "null (the recipe's) or a score in [0, 1]")
    draw = options.get("draw", False)
    check(isinstance(draw, bool), "predict.draw", draw, "true or false")
    from aifactory_train.strategies import resolve_precision

    trainer = resolved["trainer"]
    precision = resolve_precision(trainer["precision"], trainer["accelerator"])  # auto: bf16-mixed on a GPU
    check(precision in ("32-true", "32", *AUTOCAST_DTYPES), "trainer.precision", trainer["precision"],
          "auto, 32-true, bf16-mixed or 16-mixed: aift predict keeps the weights in fp32 and runs the model under "
          "autocast for a mixed precision, as eval does")

    from hydra.utils import get_class

    from aifactory_train.errors import ConfigError

    module_class = get_class(resolved["recipe"]["module"]["_target_"])
    if not hasattr(module_class, "predict_files"):
        raise ConfigError(f"recipe '{resolved['recipe']['name']}' has no `aift predict`; export the model "
                          f"(`aift export`) and run it where it is used")
    if draw and not getattr(module_class, "PREDICT_DRAWS", False):
        raise ConfigError(f"config key 'predict.draw': recipe '{resolved['recipe']['name']}' draws no pictures of its "
                          f"predictions; valid: predict.draw=false (crop_detection draws its boxes)")
    files = input_files(cfg.input, module_class.PREDICT_EXTENSIONS)  # before the checkpoint is read
    from aifactory_train.lineage import read_datacard
    from aifactory_train.usage_terms import check_usage

    # the owner of the new files may limit their use, as a training data owner may: every card at or above the
    # input and each file (resolved: a symlink into other data is covered by that data's cards)
    usage = check_usage([Path(cfg.input), *files], resolved["recipe"], config=resolved)
    run_dir = Path(cfg.paths.output_dir)
    check_output_folder(run_dir, Path(cfg.input))
    ours = earlier_outputs(run_dir)
    # before the model is loaded (the recipe's own results below); predict.json itself is rewritten at the end
    check_replaceable(run_dir, [PREDICTIONS_FILE, REPORT_FILE] if ours is None else [PREDICTIONS_FILE], ours)
    run_dir.mkdir(parents=True, exist_ok=True)

    import tempfile

    import torch

    from aifactory_train.checkpoints import check_checkpoint_task, load_trained_module, resolve_checkpoint
    from aifactory_train.provenance import training_origin
    from aifactory_train.strategies import gpu_available
    from aifactory_train.train import use_hydra_logging

    use_hydra_logging()
    ckpt_path = resolve_checkpoint(cfg.ckpt_path, run_dir)
    check_checkpoint_task(ckpt_path, resolved["recipe"])
    module = load_trained_module(module_class, ckpt_path)
    device = torch.device("cuda" if gpu_available(trainer["accelerator"]) else "cpu")
    module = module.to(device).eval()
    autocast = torch.autocast(device.type, dtype=getattr(torch, AUTOCAST_DTYPES.get(precision, "bfloat16")),
                              enabled=precision in AUTOCAST_DTYPES)
    # Everything is written to a staging folder first and moved in only when every file was read: a reader never
    # sees half the predictions, and a file that failed (named in the error) leaves no result at all.
    # A new private folder each run (never one that is there already, which might not be ours).
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=run_dir))
    input_root = Path(cfg.input) if Path(cfg.input).is_dir() else Path(cfg.input).parent
    recipe_options = {**options, "output_dir": str(staging), "input_root": str(input_root.absolute())}
    count = 0
    try:
        with torch.inference_mode(), autocast, (staging / PREDICTIONS_FILE).open("w") as out:
            for row in module.predict_files(files, options["batch_size"], recipe_options):
                out.write(json.dumps(row) + "\n")
                count += 1
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    entries = sorted(staging.iterdir())
    try:
        check_replaceable(run_dir, [entry.name for entry in entries], ours)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    outputs = []
    for entry in entries:  # these results replace an earlier run's in this folder (checked above: only ours)
        target = run_dir / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
        outputs.append(target.resolve())
    staging.rmdir()
    for stale in map(Path, (ours or set()) - {str(p) for p in outputs}):  # a run with predict.draw's pictures
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale)
        else:
            stale.unlink(missing_ok=True)  # a link is removed, never what it points to
    path = run_dir / PREDICTIONS_FILE
    trained_run_id, trained_on = training_origin(ckpt_path)
    report = {
        "checkpoint": str(Path(ckpt_path).resolve()),
        "recipe": resolved["recipe"]["name"],
        "input": str(Path(cfg.input).resolve()),
        "files": len(files),
        "rows": count,  # one per file, or per record for files of records
        "predictions": str(path.resolve()),
        "outputs": [str(p) for p in outputs if p.name != PREDICTIONS_FILE],  # the recipe's own (pictures, COCO)
        "options": options,
        "device": str(device),
        "precision": precision,
        "trained_mlflow_run_id": trained_run_id,
        "trained_on": trained_on,  # the data the model learned from (digests, owner, consent)
        "input_datacard": read_datacard(Path(cfg.input)) or None,
        "usage_check": usage,
        "output_dir": str(run_dir.resolve()),
        "wall_time_s": round(time.time() - started, 3),
    }
    (run_dir / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(f"predicted {len(files)} file(s), {count} row(s): {path}")
    return report
