"""`aift predict`: run a checkpoint on new files (no labels needed) and keep the results as files.

The recipe contract: the LightningModule has ``PREDICT_EXTENSIONS`` (the file kinds it reads) and
``predict_files(files, batch_size, options)``, which yields one JSON-able dict per file (per record, for files of
records such as a text recipe's JSONL), preprocessing each as its eval split is preprocessed. ``options`` is the
``predict`` config plus ``output_dir`` (where the recipe may write results of its own, such as pictures, moved into
the run folder when every file was read) and ``input_root`` (the input folder, to name results by path).

Nothing goes to MLflow: the files may be a company's or a patient's, and the predictions stay in the output folder,
with ``predict.json`` saying which checkpoint (and which training data) made them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from aifactory_train.data.files import input_files

PREDICTIONS_FILE = "predictions.jsonl"
REPORT_FILE = "predict.json"
STAGING_PREFIX = ".predict-"  # a private folder of results until every file was read
AUTOCAST_DTYPES = {"bf16-mixed": "bfloat16", "16-mixed": "float16"}


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


def run_prediction(cfg) -> dict[str, Any]:
    started = time.time()
    from aifactory_train.commands.preamble import open_checkpoint_command
    from aifactory_train.recipe import Predicts
    from aifactory_train.records.config import check

    command = open_checkpoint_command(cfg, "aift predict", Predicts,
                                      "has no `aift predict`; export the model (`aift export`) and run it where it is "
                                      "used")
    resolved, module_class = command.resolved, command.recipe.module_class
    # checked by the recipe's schema (PredictOptions or the recipe's subclass), with its defaults filled in
    options = dataclasses.asdict(command.typed.predict)
    draw = options.get("draw", False)
    from aifactory_train.run.strategies import resolve_precision

    trainer = resolved["trainer"]
    precision = resolve_precision(trainer["precision"], trainer["accelerator"])  # auto: bf16-mixed on a GPU
    check(precision in ("32-true", "32", *AUTOCAST_DTYPES), "trainer.precision", trainer["precision"],
          "auto, 32-true, bf16-mixed or 16-mixed: aift predict keeps the weights in fp32 and runs the model under "
          "autocast for a mixed precision, as eval does")

    from aifactory_train.errors import ConfigError

    if draw and not module_class.PREDICT_DRAWS:
        raise ConfigError(f"config key 'predict.draw': recipe '{resolved['recipe']['name']}' draws no pictures of its "
                          f"predictions; valid: predict.draw=false")
    files = input_files(cfg.input, module_class.PREDICT_EXTENSIONS)  # before the checkpoint is read
    from aifactory_train.records.lineage import read_datacard
    from aifactory_train.records.usage_terms import check_usage

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

    from aifactory_train.run.provenance import training_origin
    from aifactory_train.run.strategies import gpu_available

    ckpt_path = command.find_checkpoint()
    module = command.load_module()
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
