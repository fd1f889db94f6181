"""`aift`: the command line of aifactory-train.

Only the standard library is imported at start-up; each subcommand imports what it needs, so
`aift --help` answers instantly. `aift train`, `eval`, `predict` and `export` are Hydra apps: everything after the
subcommand is handed to Hydra (overrides, --cfg job, -m, hydra.run.dir=...).
"""

from __future__ import annotations

import argparse
import os
import sys

USAGE = """\
aift: train the AI Factory Groningen's recipes, from a laptop smoke run to a multi-node job.

usage:
  aift train recipe=NAME [KEY=VALUE ...]   train (a Hydra app: --cfg job, -m, hydra.run.dir=DIR; --help)
  aift eval recipe=NAME ckpt_path=FILE     test-split metrics of a checkpoint (--help)
  aift predict recipe=NAME ckpt_path=FILE input=DIR
                                           predictions for new files, one JSON line each (--help)
  aift export recipe=NAME ckpt_path=FILE   a deployable model in a format of the recipe (onnx, hf), checked
                                           against the checkpoint on real records, + provenance.json (--help)
  aift recipes list                        the recipes: task, default model, data format
  aift recipes copy SOURCE NAME --to DIR   a recipe copied and renamed into DIR, to adapt; use it with
                                           AIFT_RECIPES_PATH=DIR (every command then finds it)
  aift recipes new NAME --task TASK [--to DIR]
                                           a minimal working recipe for a task from a template, to grow
                                           (the tasks: aift recipes new --help)
  aift recipes show NAME                   a recipe's data layout, experiments, options, exports, benchmark
  aift data synth RECIPE --out DIR         write a demo dataset of real files
  aift data deidentify recipe=NAME data.root=RAW --out DIR
                                           de-identify sensitive text (the text recipe: deduce) before training
  aift data check recipe=NAME data.root=DIR [--out DIR]
                                           a data health report (counts, classes, sizes, leakage, terms)
                                           without training; exit 1 when training would refuse it or it leaks
  aift data runs recipe=NAME data.root=DIR [tracking.uri=URI]
                                           the runs (and checkpoints) that used this data, found by digest
  aift data digest recipe=NAME data.root=DIR [--recompute]
                                           the data's digests as a run records them (--recompute: every byte)
  aift launch [--dry-run] [-m] KEY=VALUE ...
                                           render + submit an sbatch job (-m: one job per sweep point)
  aift launch --local N KEY=VALUE ...      the same job as N processes on this machine (smoke test)
  aift data card check PATH                a data card validated; what it permits, in plain words
  aift audit verify [PATH]                 the audit log's hash chain: exit 1 naming the first bad line
  aift cluster accounts cluster=NAME [--dry-run]
                                           the profile's tracks (fair-share) and projects as Slurm accounts
  aift usage cluster=NAME [--since D] [--until D] [--format table|csv|json] [--chart PNG]
                                           GPU/CPU-hours, kWh and jobs per track and project (sacct + MLflow)
  aift plan [--format json] KEY=VALUE ...  what a job needs before it is queued: memory per GPU, speed,
                                           GPU-hours, kWh, CO2, allocation (the overrides of aift launch)
  aift checkpoint consolidate DIR          a DeepSpeed (ZeRO) checkpoint folder -> one fp32 checkpoint file
  aift bench SUITE [--profile P] [--quick] measure: micro | recipes | acceptance (pass/fail vs a profile)
  aift --version
  aift --verbose COMMAND ...               on a failure, also print the traceback (always in the log it names)

A failure prints one line (exit 2: a mistake in the command or config, it says which; 1: anything else, with the
log file that holds the traceback; 130: Ctrl-C; 143: stopped by SIGTERM after saving a checkpoint).

Examples:
  aift recipes list                               (NAME: one of these)
  aift data synth NAME --out data/NAME
  aift train recipe=NAME debug=smoke
  aift train recipe=NAME data.root=/path/to/images model=efficientnet_b0 trainer.max_epochs=20
"""


VERBOSE_FLAG = "--verbose"
# Lightning warns on every Trainer when Slurm's srun is installed but the run was not started by it; a local run
# (aift train on a laptop or login node) is not meant to be, and `aift launch` starts its jobs with srun
SRUN_WARNING = r"The `srun` command is available on your system but is not used"


def _fail(message: str) -> int:
    from aifactory_train.records.masking import redact_text

    print(f"error: {redact_text(message)}", file=sys.stderr)
    return 2


def _given_run_dirs(args: list[str]) -> dict[str, bool]:
    """The run folders the command line names (hydra.run.dir, hydra.sweep.dir) and whether each held anything
    before this command: a failed run never removes a folder the user gave that already had content."""
    from pathlib import Path

    given = {}
    for arg in args:
        key, _, value = arg.partition("=")
        if key.lstrip("+") in ("hydra.run.dir", "hydra.sweep.dir") and value:
            path = Path(value).expanduser()
            given[str(path.resolve())] = path.exists()
    return given


def _preflight(cfg, command: str) -> None:
    """The checks that need no heavy import, before the command's module pulls in Lightning and opens the tracking
    store: the checkpoint is there, the config is valid, the data and this machine's devices fit it. A mistake
    then fails in a second or two, leaving nothing behind."""
    from pathlib import Path

    from aifactory_train.records.config import check_data, check_devices, require_checkpoint, validate

    typed = validate(cfg)
    if command in ("train", "eval"):
        check_data(typed, stage="fit" if command == "train" else "eval")
    if command in ("eval", "predict", "export"):
        from aifactory_train.run.checkpoints import resolve_checkpoint

        require_checkpoint(cfg, f"aift {command}")
        resolve_checkpoint(cfg.ckpt_path, Path(cfg.paths.output_dir))
    check_devices(typed, command)  # last: on a GPU machine it imports torch


def _redact_hydra_files() -> None:
    """Hydra writes the command line's overrides (``tracking.uri=http://user:pw@...``) and the config into the run
    folder's ``.hydra/`` (and a sweep's ``multirun.yaml``) before the task starts: rewrite them with the passwords
    masked, before anything else happens in the run."""
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from aifactory_train.records.masking import redact_yaml_file

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.output_subdir is not None:
        folder = Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir
        for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
            redact_yaml_file(folder / name)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        redact_yaml_file(Path(hydra_cfg.sweep.dir) / "multirun.yaml")


def _hydra_app(command: str, config_name: str, args: list[str], searchpath: list[str] | None = None,
               verbose: bool = False) -> int:
    import warnings
    from pathlib import Path

    import hydra

    from aifactory_train.locations import config_dir

    original_argv = list(sys.argv)
    given = _given_run_dirs(args)
    warnings.filterwarnings("ignore", message=SRUN_WARNING)

    def task(cfg) -> None:
        # Hydra has parsed its arguments; restore the real command line, because Lightning's DDP launcher
        # starts the other ranks by re-running it (plus hydra.run.dir=<this run's folder>).
        sys.argv = original_argv
        _redact_hydra_files()  # before anything else reads or copies the run folder
        from hydra.core.hydra_config import HydraConfig

        from aifactory_train.commands.failures import fresh_run_dir, report_job_failure

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        fresh = fresh_run_dir(run_dir, given)
        from aifactory_train.records.audit import command_ended

        from aifactory_train.records.secure import secure_profile

        try:
            _preflight(cfg, command)
            with secure_profile(cfg, run_dir):  # profile=secure: offline, fenced, owner-only, private temp files
                outcome = _run_command(command, cfg)
        except (Exception, KeyboardInterrupt) as err:
            command_ended(command, run_dir, error=err, config=cfg)  # the audit log: refused or failed
            # handled here, not by Hydra, which would print "Error executing job" and the traceback
            sys.exit(report_job_failure(err, run_dir, fresh, verbose))
        command_ended(command, run_dir, result=outcome, config=cfg)  # the audit log: one line per action
        if command == "train" and isinstance(outcome, dict) and outcome.get("status") == "stopped":
            sys.exit(143)  # 128 + SIGTERM: stopped, not finished (the checkpoint is saved)

    sys.argv = [f"aift {command}", *(searchpath or []), *args]
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra's own errors (composition) reach main() as exceptions
    try:
        hydra.main(config_path=str(config_dir()), config_name=config_name, version_base="1.3")(task)()
    except Exception as err:
        from aifactory_train.records.config import composition_error

        raise composition_error(err, config_name, [*(searchpath or []), *args]) from err
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
    return 0


def _run_command(command: str, cfg):
    if command == "train":
        from aifactory_train.commands.train import run_training

        return run_training(cfg)
    if command == "eval":
        from aifactory_train.commands.evaluate import run_evaluation

        return run_evaluation(cfg)
    if command == "predict":
        from aifactory_train.commands.predict import run_prediction

        return run_prediction(cfg)
    from aifactory_train.commands.export import run_export

    return run_export(cfg)


RECIPES_LIST_WIDTH = 100


def _recipes_list() -> int:
    from aifactory_train.locations import recipe_info, recipe_names

    rows = [("NAME", "TASK", "DEFAULT MODEL", "", "")]
    sources = {}
    for name in recipe_names():
        info = recipe_info(name)
        rows.append((info.name, info.task, info.default_model, info.data_format, info.description))
        if info.source != "shipped":
            sources[name] = info.source
    # fits 100 columns: name, task and default model in a table; the description and the data format, long
    # sentences, wrapped on indented lines below each recipe
    import textwrap

    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    for n, row in enumerate(rows):
        print(f"{row[0].ljust(widths[0])}  {row[1].ljust(widths[1])}  {row[2]}")
        if n:  # not for the header
            for line in [*textwrap.wrap(row[4], RECIPES_LIST_WIDTH - 4),
                         *textwrap.wrap("data: " + row[3], RECIPES_LIST_WIDTH - 4, subsequent_indent="      ")]:
                print("    " + line)
    for name, source in sources.items():
        print(f"{name}: from {source} ($AIFT_RECIPES_PATH)")
    return 0


def _recipes_copy(args: argparse.Namespace) -> int:
    from pathlib import Path

    from aifactory_train.catalogue.copy import copy_recipe

    written = copy_recipe(args.source, args.name, args.to)
    root = Path(args.to).expanduser().resolve()
    print(f"wrote {len(written)} files: {root / args.name}/ and {root / 'configs'}/")
    _print_next_steps(root, args.name, f"   (the demo data of {args.source})", "data.py, module.py, config.py, configs/")
    return 0


def _print_next_steps(root, name: str, data_note: str, adapt: str) -> None:
    """What a new recipe folder needs next: $AIFT_RECIPES_PATH (unless it lists the folder already), demo data, a
    smoke run, the files to adapt."""
    from pathlib import Path

    path = os.environ.get("AIFT_RECIPES_PATH")
    listed = path and str(root) in [str(Path(p).expanduser().resolve()) for p in path.split(os.pathsep)]
    if not listed:
        print(f"make aift find it:  export AIFT_RECIPES_PATH={root}{os.pathsep + '$AIFT_RECIPES_PATH' if path else ''}")
    print(f"then:  aift data synth {name} --out data/{name}{data_note}")
    print(f"       aift train recipe={name} data.root=data/{name} debug=smoke")
    print(f"adapt: {root / name}/ ({adapt})")


def _recipes_new(args: argparse.Namespace) -> int:
    from pathlib import Path

    from aifactory_train.catalogue.new import new_recipe

    written = new_recipe(args.name, args.task, args.to)
    root = Path(args.to).expanduser().resolve()
    print(f"wrote {len(written)} files: {root / args.name}/")
    _print_next_steps(root, args.name, "", "synth.py, data.py, module.py, config.py, configs/")
    return 0


def _recipes_show(args: argparse.Namespace) -> int:
    from aifactory_train.catalogue.show import show_recipe

    print(show_recipe(args.name))
    return 0


def _data_synth(args: argparse.Namespace) -> int:
    from aifactory_train.locations import load_object, recipe_info

    info = recipe_info(args.recipe)
    synthesize = load_object(info.synth)
    out = synthesize(out=args.out, size=args.size, seed=args.seed, variant=args.variant, overwrite=args.overwrite)
    print(f"wrote {out}")
    if info.deidentify:
        print(f"de-identify it first: aift data deidentify recipe={args.recipe} data.root={out} --out DIR")
    else:
        print(f"train on it: aift train recipe={args.recipe} data.root={out}")
    return 0


def _data_use_allowed(resolved: dict) -> None:
    """Reading a dataset to digest it is a use too: the owner's terms are checked as for training."""
    from aifactory_train.records.usage_terms import check_usage, data_paths

    check_usage(data_paths(resolved["data"]), resolved["recipe"], config=resolved)


def _validated_train_config(overrides: list[str]):
    """The `aift train` config for ``overrides`` (validated) and its resolved dict, for the data tools."""
    import tempfile

    from omegaconf import OmegaConf

    from aifactory_train.records.config import compose_train_config, validate

    with tempfile.TemporaryDirectory() as run_dir:  # nothing is written there; paths.output_dir must resolve
        cfg = compose_train_config(overrides, run_dir)
        validate(cfg)
        return cfg, OmegaConf.to_container(cfg, resolve=True)


def _data_deidentify(args: argparse.Namespace) -> int:
    import json

    from aifactory_train.errors import ConfigError
    from aifactory_train.locations import load_object

    _, resolved = _validated_train_config(args.overrides)
    recipe = resolved["recipe"]
    if not recipe.get("deidentify"):
        raise ConfigError(f"recipe '{recipe['name']}' has no de-identification step (recipe.deidentify is empty)")
    from aifactory_train.records.usage_terms import check_usage, data_paths

    # a step on the data is a use of it: the source's terms are checked as a training run's are, before it is read
    check_usage(data_paths(resolved["data"]), recipe, config=resolved)
    deidentify = load_object(recipe["deidentify"])
    report = deidentify(resolved["data"], out=args.out, overwrite=args.overwrite)
    print(json.dumps({"records": report["records"], "tags": report["tags"], "notes_per_s": report["notes_per_s"]}))
    print(f"wrote {args.out} (de-identified; report: deidentification_report.json)")
    print(f"train on it: aift train recipe={recipe['name']} data.root={args.out}")
    return 0


def _print_digests(lineage) -> None:
    print(f"data {lineage.root}: digest {lineage.digest}")
    for name, split in lineage.splits.items():
        print(f"  {name}: {split.num_rows} rows, digest {split.digest}")


def _data_runs(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from aifactory_train.records.config import build
    from aifactory_train.errors import ConfigError
    from aifactory_train.records.tracking import runs_trained_on

    cfg, resolved = _validated_train_config(args.overrides)
    _data_use_allowed(resolved)
    tracking = resolved["tracking"]
    if tracking["backend"] != "mlflow":
        raise ConfigError("aift data runs searches an MLflow store: give tracking.uri=... (tracking=none has none)")
    datamodule = build(cfg.data, _convert_="all")
    datamodule.setup("fit")  # the same reading and digest as a training run of this recipe
    lineage = datamodule.lineage()
    from aifactory_train.records.withdrawal import summary as withdrawal_lists

    current = withdrawal_lists(lineage.root)  # the data's withdrawal lists as they are now
    runs = runs_trained_on(tracking["uri"], lineage, current)
    from aifactory_train.records.masking import redact_uri

    shown = redact_uri(tracking["uri"])  # printed and written: no password
    _print_digests(lineage)
    if not runs:
        print(f"no run in {shown} used this data")
    else:
        print(f"{len(runs)} run(s) in {shown} used this data:")
        for run in runs:
            shared = "all splits" if run["all_data"] else ("splits " + ", ".join(run["splits"]) if run["splits"] else
                                                           "this data.root, other digests")
            print(f"  {run['start_time']}  {run['run_id']}  {run['kind']:5s}  {run['experiment']}/{run['run_name']}  "
                  f"{run['status']}{' (deleted)' if run['deleted'] else ''}  {shared}"
                  + (f"  checkpoint {run['best_checkpoint']}" if run["best_checkpoint"] else ""))
            for export in run["exports"]:
                print(f"      exported: {export}")
            for version in run["registered"]:
                print(f"      registered: {version}")
            if run["withdrawal"] and run["withdrawal"]["before_current_list"]:
                applied = "; ".join(f"{w['list']}: " + (f"sha256 {w['run_sha256']}" if w["run_sha256"] else
                                                         "not applied") for w in run["withdrawal"]["lists"])
                print(f"      TRAINED BEFORE THE CURRENT WITHDRAWAL LIST (the run: {applied}): retrain it, and "
                      f"replace its exported and registered models")
        stale = [r for r in runs if r["withdrawal"] and r["withdrawal"]["before_current_list"]]
        for w in current:
            print(f"withdrawal list {w['list']}: sha256 {w['sha256']}, {w['ids']} id(s)")
        if current:
            print(f"{len(stale)} run(s) trained before the current withdrawal list"
                  + (": retrain them" if stale else ""))
    if args.out:
        report = {"data": lineage.as_dict(), "tracking_uri": shown, "runs": runs}
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from aifactory_train.data.data_check import run_data_check

    return run_data_check(args.overrides, args.out)


def _data_digest(args: argparse.Namespace) -> int:
    import json
    import os
    from pathlib import Path

    from aifactory_train.records.config import build

    if args.recompute:  # read every byte once and rewrite this user's cache (aifactory_train/records/lineage.py)
        os.environ["AIFT_DIGEST_CACHE"] = "refresh"
    cfg, resolved = _validated_train_config(args.overrides)
    _data_use_allowed(resolved)
    datamodule = build(cfg.data, _convert_="all")
    datamodule.setup("fit")  # the same reading and digest as a training run of this recipe
    lineage = datamodule.lineage()
    _print_digests(lineage)
    if args.out:
        Path(args.out).write_text(json.dumps(lineage.as_dict(), indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import shlex

    from aifactory_train.bench.suites import run_bench

    tracking_uri = None if args.no_tracking else (args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    from aifactory_train.records.masking import redact_text

    command = redact_text("aift " + " ".join(shlex.quote(a) for a in sys.argv[1:]))  # goes into the report
    return run_bench(args.suite, args.profile, args.quick, args.out, tracking_uri, command)


def _launch(args: argparse.Namespace) -> int:
    if args.local is not None:
        from aifactory_train.errors import ConfigError

        if args.local < 1:
            raise ConfigError(f"--local {args.local}: give the number of processes, >= 1")
        if args.multirun:
            raise ConfigError("--local runs one job on this machine; for a local sweep use `aift train -m ...`")
        strategy = [] if any(o.startswith("strategy=") for o in args.overrides) else ["strategy=ddp"]
        shape = [o for o in args.overrides if o.split("=")[0] not in ("trainer.devices", "trainer.num_nodes")]
        from aifactory_train.locations import use_recipes

        return _hydra_app("train", "train", [*shape, *strategy, f"trainer.devices={args.local}", "trainer.num_nodes=1"],
                          use_recipes())
    from hydra.errors import HydraException

    from aifactory_train.errors import ConfigError
    from aifactory_train.launch.slurm import launch

    from aifactory_train.records.audit import command_ended

    try:
        code = launch(args.overrides, args.dry_run, args.job_name, args.run_dir, multirun=args.multirun,
                      data_check=not args.no_data_check, ignore_plan=args.ignore_plan)
    except HydraException as err:  # one line, as `aift train` reports Hydra's errors, not a traceback
        raise ConfigError((str(err).strip().splitlines() or [type(err).__name__])[0]) from None
    except Exception as err:
        command_ended("launch", None, error=err)  # the audit log: a job refused (or failing) before the queue
        raise
    if not args.dry_run:
        command_ended("launch", None, result={"status": "queued" if code == 0 else f"exit {code}"})
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aift", description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage=argparse.SUPPRESS)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument(VERBOSE_FLAG, action="store_true",
                        help="on a failure, also print the traceback here (it always goes to the log file named)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("train", help="train a recipe (Hydra app; `aift train --help`)", add_help=False)
    sub.add_parser("eval", help="score a checkpoint (Hydra app; `aift eval --help`)", add_help=False)
    sub.add_parser("predict", help="a checkpoint's predictions for new files (Hydra app; `aift predict --help`)",
                   add_help=False)
    sub.add_parser("export", help="export a checkpoint (Hydra app; `aift export --help`)", add_help=False)
    recipes = sub.add_parser("recipes", prog="aift recipes", help="list, show, copy or create recipes",
                             description="The recipes this install knows (shipped, and those of $AIFT_RECIPES_PATH).")
    recipes_sub = recipes.add_subparsers(dest="recipes_command", metavar="ACTION", required=True)
    recipes_sub.add_parser("list", prog="aift recipes list", help="name, task, default model, description, data format",
                           description="List the recipes: name, task, default model; below each its description "
                                       "and data format (fits 100 columns).")
    copy = recipes_sub.add_parser(
        "copy", prog="aift recipes copy", help="copy a recipe under a new name, to adapt",
        description="Copy a recipe's code (DIR/NAME/) and configs (DIR/configs/: recipe, data, experiments) into DIR, "
                    "renamed: package, classes, config names and every _target_, so the copy runs its own code. "
                    "Nothing that exists is overwritten. Use it with AIFT_RECIPES_PATH=DIR.")
    copy.add_argument("source", metavar="SOURCE", help="the recipe to copy (see `aift recipes list`)")
    copy.add_argument("name", metavar="NAME",
                      help="the new recipe's name: lower-case letters, digits and _, e.g. tulip_grading")
    copy.add_argument("--to", required=True, metavar="DIR",
                      help="the folder of your recipes (created if new; shared by several)")
    from aifactory_train.catalogue.new import tasks

    new = recipes_sub.add_parser(
        "new", prog="aift recipes new", help="a minimal working recipe for a task, from a template",
        description="Write a minimal working recipe (DIR/NAME/: code, configs, demo data generator) for TASK from "
                    "a small template, to grow into your use case. Nothing that exists is overwritten. Use it with "
                    "AIFT_RECIPES_PATH=DIR.")
    new.add_argument("name", metavar="NAME",
                     help="the new recipe's name: lower-case letters, digits and _, e.g. tulip_grading")
    new.add_argument("--task", required=True, choices=tasks(), help="what the recipe learns")
    new.add_argument("--to", default="recipes_local", metavar="DIR",
                     help="the folder of your recipes (created if new; shared by several; default: recipes_local)")
    show = recipes_sub.add_parser(
        "show", prog="aift recipes show", help="one recipe: task, data layout, experiments, options, exports",
        description="Show a recipe: its task, the data layout it reads, its experiments with their launch lines, "
                    "the key options with their defaults, the demo-data command, its export formats and its latest "
                    "benchmark figure.")
    show.add_argument("name", metavar="NAME", help="the recipe (see `aift recipes list`)")
    data = sub.add_parser("data", prog="aift data", help="data tools", description="Data tools.")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    synth = data_sub.add_parser(
        "synth",
        prog="aift data synth",
        help="write a demo dataset",
        description="Write a synthetic demo dataset of real files (images/annotations/notes) for a recipe.",
    )
    synth.add_argument("recipe", help="recipe name (see `aift recipes list`)")
    synth.add_argument("--out", required=True, help="output folder; must be empty or new unless --overwrite")
    synth.add_argument("--size", type=int, default=None, help="number of training examples (recipe default if unset)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    synth.add_argument("--variant", default=None, help="recipe-specific variant, e.g. multispectral for the image classification recipe")
    synth.add_argument("--overwrite", action="store_true", help="replace the dataset in a non-empty --out folder")
    deidentify = data_sub.add_parser(
        "deidentify",
        prog="aift data deidentify",
        help="de-identify a dataset",
        description="Replace names, dates, ages, BSNs, phone numbers, addresses and institutions in the recipe's "
                    "text fields by tags (the text recipe: deduce), writing the same splits into --out with a data "
                    "card marked deidentified: true and a report of counts per tag type (never the originals).",
    )
    deidentify.add_argument("overrides", nargs="*", help="train overrides naming the data, e.g. recipe=NAME "
                                                        "data.root=RAW data.text_field=note")
    deidentify.add_argument("--out", required=True, help="output folder; must be empty or new unless --overwrite")
    deidentify.add_argument("--overwrite", action="store_true", help="replace the dataset in a non-empty --out folder")
    runs = data_sub.add_parser(
        "runs",
        prog="aift data runs",
        help="the runs that used a dataset",
        description="Which runs (training and eval, all experiments, deleted ones included) used this data? Reads "
                    "the data as the recipe does, computes its digests and finds every run in the MLflow store whose "
                    "dataset inputs have one of them, with the splits it shares, its checkpoint, where its models "
                    "were exported to and the registered model versions made of them: the data owner's question.",
    )
    runs.add_argument("overrides", nargs="*", help="train overrides naming the data and the store, e.g. "
                                                  "recipe=NAME data.root=DIR tracking.uri=sqlite:///mlflow.db")
    runs.add_argument("--out", default=None, help="also write the data's digests and the runs as JSON here")
    digest = data_sub.add_parser(
        "digest",
        prog="aift data digest",
        help="a dataset's digests, as a training run records them",
        description="Reads the data as the recipe does and prints the SHA-256 digest of the dataset and of each split "
                    "(over every file's bytes, path and label). File hashes come from this user's cache while a file's "
                    "size, times, inode and device are unchanged; --recompute reads every byte and rewrites the cache.",
    )
    digest.add_argument("overrides", nargs="*", help="train overrides naming the data, e.g. recipe=NAME "
                                                    "data.root=DIR")
    digest.add_argument("--recompute", action="store_true", help="read every file again, not the digest cache")
    digest.add_argument("--out", default=None, help="also write the digests as JSON here")
    check = data_sub.add_parser(
        "check",
        prog="aift data check",
        help="a dataset's health report, without training",
        description="Read the data as training would (the recipe's reader and digest) and report, per split: counts, "
                    "class balance, image and box sizes, text lengths (numbers only, never text), what the readers "
                    "left out or could not read, duplicates within a split and leakage across splits (the same file "
                    "or record content in two splits, from the digest's SHA-256s), the data card and whether its usage "
                    "terms allow this user, recipe, host and account. Writes data_check.json, data_check.md and "
                    "pictures (class histogram, box sizes, lengths, a contact sheet of labelled samples; none for "
                    "sensitive text) into --out.",
        epilog="exit status: 0 healthy (warnings allowed); 1 problems: the reader refuses the data, the usage "
                    "terms refuse this use, or content leaks across splits; 2 a bad config or command line.",
    )
    check.add_argument("overrides", nargs="*", help="train overrides naming the data, e.g. recipe=NAME "
                                                   "data.root=DIR")
    check.add_argument("--out", default=None,
                       help="output folder (default outputs/<recipe>/data_check/<date>_<time>)")
    checkpoint = sub.add_parser("checkpoint", prog="aift checkpoint", help="checkpoint tools",
                                description="Checkpoint tools.")
    checkpoint_sub = checkpoint.add_subparsers(dest="checkpoint_command", metavar="ACTION", required=True)
    consolidate = checkpoint_sub.add_parser(
        "consolidate", prog="aift checkpoint consolidate", help="DeepSpeed checkpoint folder -> one fp32 file",
        description="Gather a DeepSpeed ZeRO checkpoint folder (sharded over ranks) into one fp32 Lightning checkpoint "
                    "that aift eval / aift export read on any number of devices. The folder is kept.")
    consolidate.add_argument("checkpoint", help="the DeepSpeed checkpoint folder, e.g. outputs/<run>/checkpoints/last.ckpt")
    consolidate.add_argument("--out", default=None, help="output file (default <name>-consolidated.ckpt beside it)")
    consolidate.add_argument("--trust-checkpoint", action="store_true",
                             help="load shards that fail the weights-only check (they can run code when unpickled): "
                                  "only for a checkpoint you made or trust; each such file is named on stderr")
    launch = sub.add_parser(
        "launch",
        prog="aift launch",
        help="submit a training job to Slurm",
        description="Render slurm/sbatch.sh.j2 for the cluster profile (nodes = trainer.num_nodes, one task per "
                    "device, USR1 to every rank before the time limit), check that the job fits the profile's "
                    "nodes, and submit it with sbatch; --dry-run prints the resolved config and the script.",
    )
    launch.add_argument("overrides", nargs="*", help="the same overrides as aift train, e.g. recipe=... cluster=...")
    launch.add_argument("--dry-run", action="store_true", help="print the config and script, submit nothing")
    launch.add_argument("-m", "--multirun", action="store_true",
                        help="one job per point of a sweep (seed=1,2 optim.lr=1e-4,3e-4: 4 jobs), run folders "
                             "<run-dir>/<i>; all points are validated before the first is submitted")
    launch.add_argument("--local", type=int, default=None, metavar="N",
                        help="no Slurm: run N processes on this machine (one per device, DDP unless a strategy is "
                             "given), as a smoke test of a multi-process job")
    launch.add_argument("--no-data-check", action="store_true",
                        help="submit without first checking here that data.root and its split files exist (for "
                             "data only the compute nodes see, e.g. staged to node-local disk)")
    launch.add_argument("--ignore-plan", action="store_true",
                        help="submit even when `aift plan` refuses the job (GPU memory, the track's allocation, "
                             "energy.budget_kwh); the override is recorded in the job script, plan.json and stderr")
    launch.add_argument("--job-name", default=None, help="Slurm job name (default aift-<recipe>)")
    launch.add_argument("--run-dir", default=None, help="the run folder (default outputs/<recipe>/<date>_<time>)")
    from aifactory_train.commands.terms import add_parsers

    add_parsers(data_sub, sub)  # aift data card check, aift audit verify
    cluster = sub.add_parser("cluster", prog="aift cluster", help="facility administration of a cluster profile",
                             description="Facility administration of a cluster profile.")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    accounts = cluster_sub.add_parser(
        "accounts", prog="aift cluster accounts", help="create the tracks and projects as Slurm accounts",
        description="Make Slurm's accounts match the profile with sacctmgr: one account per track (cluster.accounts) "
                    "with its fair-share (cluster.shares), the projects (cluster.projects) as sub-accounts of their "
                    "track's account, and their users. Adds what is missing, sets what differs, deletes nothing; "
                    "running it again changes nothing. Needs a Slurm admin (root or AdminLevel=Admin).")
    accounts.add_argument("overrides", nargs="*", help="cluster=NAME [cluster.KEY=VALUE ...]")
    accounts.add_argument("--dry-run", action="store_true", help="print the sacctmgr commands, run none")
    usage = sub.add_parser(
        "usage", prog="aift usage", help="what each track and project used (sacct + MLflow)",
        description="Jobs, CPU-hours, GPU-hours and kWh per allocation track and project over a period, from Slurm's "
                    "accounting (sacct, all users) joined by job id with the MLflow runs of the jobs (their energy "
                    "ledgers, data owners, exported models); each track's share against its fair-share target.")
    usage.add_argument("overrides", nargs="*", help="cluster=NAME [cluster.KEY=VALUE ...]")
    usage.add_argument("--since", default=None, help="start: YYYY-MM-DD or ISO time (default: this month's first day)")
    usage.add_argument("--until", default=None, help="end: YYYY-MM-DD or ISO time (default: now)")
    usage.add_argument("--format", choices=["table", "csv", "json"], default="table")
    usage.add_argument("--chart", default=None, metavar="PNG", help="also write a bar chart of the tracks' shares")
    usage.add_argument("--tracking-uri", default=None,
                       help="the MLflow store of the jobs' runs (default: $MLFLOW_TRACKING_URI; none: no run links)")
    plan = sub.add_parser(
        "plan", prog="aift plan", help="what a job needs: memory, speed, GPU-hours, kWh, allocation",
        description="Plan a job before it is queued (or a proposal before it is accepted), from the same overrides "
                    "as aift launch: memory per GPU for the strategy (model built on the meta device), step time "
                    "and throughput from the benchmark results of the cluster's GPU, GPU-hours, kWh, CO2 and wall "
                    "time for the planned steps, and whether it fits the GPUs, the track's allocation and "
                    "energy.budget_kwh. Figures not measured on that hardware and shape are marked EXTRAPOLATED.")
    plan.add_argument("overrides", nargs="*", help="the overrides of aift launch, e.g. recipe=NAME "
                                                   "cluster=aifactory_h100 trainer.num_nodes=4 strategy=deepspeed_zero3")
    plan.add_argument("--format", choices=["text", "json"], default="text", help="text (default) or json")
    plan.add_argument("--out", default=None, help="write the plan to this file instead of printing it")
    plan.add_argument("--train-samples", type=int, default=None, metavar="N",
                      help="training samples per epoch, for the steps of trainer.max_epochs (without trainer.max_steps)")
    plan.add_argument("--grid-intensity", type=float, default=None, metavar="G",
                      help="grid carbon intensity in g CO2/kWh (default: the cluster profile's grid_g_co2_per_kwh)")
    bench = sub.add_parser(
        "bench",
        prog="aift bench",
        help="benchmarks and hardware acceptance",
        description="Measure the hardware and the recipes; `acceptance` checks a profile of thresholds: exit 0 "
                    "passed, 1 failed, 3 inconclusive (a ratio's spread straddles its threshold: rerun on a quieter "
                    "machine). Writes JSON, Markdown and plots into --out and logs them to MLflow as one run.",
    )
    bench.add_argument("suite", choices=["micro", "recipes", "acceptance"],
                       help="micro: GEMM, memory, host-device, all-reduce, data loading; recipes: each recipe vs a "
                            "plain PyTorch loop; acceptance: both, checked against --profile")
    bench.add_argument("--profile", default=None, help="benchmarks/profiles/NAME.yaml (cpu_ci, h100_sxm, h200) or a path")
    bench.add_argument("--quick", action="store_true", help="small sizes and few steps (CI, < 3 min on 2 cores)")
    bench.add_argument("--out", default=None, help="output folder (default outputs/bench/<suite>_<hardware>_<date>)")
    bench.add_argument("--tracking-uri", default=None, help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    bench.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Every failure ends here as one line on stderr (plus, for an unexpected one, the log file that holds its
    traceback) and an exit code: see aifactory_train.commands.failures."""
    from aifactory_train.commands.failures import report_failure

    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = VERBOSE_FLAG in argv  # global: before or after the subcommand (Hydra would take it for an override)
    argv = [a for a in argv if a != VERBOSE_FLAG]
    try:
        return _main(argv, verbose)
    except SystemExit:
        raise
    except (Exception, KeyboardInterrupt) as err:
        return report_failure(err, verbose)


def _main(argv: list[str], verbose: bool) -> int:
    from aifactory_train.records.masking import redact_log_records
    from aifactory_train.records.telemetry import switch_off_telemetry

    switch_off_telemetry()  # data sovereignty: before any library that reports usage is imported
    redact_log_records()  # a password in a URI never reaches a log line (console or the run's log file)
    from aifactory_train.records.audit import begin_command

    begin_command()  # the audit line of this command says what this command checked (several may run in a process)
    from aifactory_train.errors import AiftError
    from aifactory_train.locations import use_recipes

    searchpath = use_recipes()  # $AIFT_RECIPES_PATH: importable, and its configs found by Hydra
    if argv and argv[0] in ("train", "eval", "predict", "export"):
        return _hydra_app(argv[0], argv[0], argv[1:], searchpath, verbose)
    args = _parser().parse_args(argv)
    args.verbose = verbose
    if args.version:
        from aifactory_train import __version__

        print(f"aifactory-train {__version__}")
        return 0
    try:
        if args.command == "recipes":
            actions = {"list": lambda _: _recipes_list(), "copy": _recipes_copy, "new": _recipes_new,
                       "show": _recipes_show}
            return actions[args.recipes_command](args)
        if args.command == "data":
            from aifactory_train.commands.terms import card_check

            actions = {"check": _data_check, "deidentify": _data_deidentify, "digest": _data_digest, "runs": _data_runs,
                       "synth": _data_synth, "card": card_check}
            return actions[args.data_command](args)
        if args.command == "audit":
            from aifactory_train.commands.terms import audit_verify

            return audit_verify(args)
        if args.command == "checkpoint":
            from aifactory_train.run.checkpoints import consolidate

            target, unverified = consolidate(args.checkpoint, args.out, trust=args.trust_checkpoint)
            for line in unverified:  # on record: what --trust-checkpoint let through
                print(f"warning: --trust-checkpoint: loaded unverified: {line}", file=sys.stderr)
            print(f"wrote {target}")
            return 0
        if args.command == "bench":
            return _bench(args)
        if args.command == "cluster":
            from aifactory_train.launch.accounts import apply_accounts, load_profile

            commands = apply_accounts(load_profile(args.overrides), dry_run=args.dry_run)
            for line in commands:
                print(line)
            print(("would run" if args.dry_run else "ran") + f" {len(commands)} sacctmgr command(s)"
                  + ("" if commands else ": the accounts match the profile"))
            return 0
        if args.command == "usage":
            from aifactory_train.launch.usage_report import run_usage

            return run_usage(args.overrides, args.since, args.until, args.format, args.chart,
                             args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
        if args.command == "launch":
            return _launch(args)
        if args.command == "plan":
            from hydra.errors import HydraException

            from aifactory_train.launch.plan import run_plan

            try:
                return run_plan(args.overrides, args.format, args.out, args.train_samples, args.grid_intensity)
            except HydraException as err:  # one line, as aift launch reports them
                raise AiftError((str(err).strip().splitlines() or [type(err).__name__])[0]) from None
    except AiftError as err:
        return _fail(str(err))
    _parser().print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
