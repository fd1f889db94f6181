"""`aift launch`: render an sbatch script from slurm/sbatch.sh.j2 for a cluster profile, check that the job
fits the profile's nodes before any GPU hour is spent, and submit it (or print it with --dry-run)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from aifactory_train.errors import AiftError, ConfigError
from aifactory_train.slurm_env import SLURM_NAME, SLURM_NAME_VALID
from aifactory_train.locations import default_recipe
from aifactory_train.slurm_env import REQUEUE_SIGNAL_NAME

GPU_ACCELERATORS = ("gpu", "cuda")

# Every value below ends up in the job script: in an #SBATCH line (which sbatch reads up to the first space, `#` or
# line end, and stops reading at the first line that is not a comment) or in a bash command. A newline there adds a
# command to the job and silently drops the directives after it, so values are checked against what Slurm accepts
# before anything is written or queued, and what the script body uses is shell-quoted as well.
SLURM_TIME = re.compile(r"([0-9]+-)?[0-9]{1,2}:[0-9]{2}:[0-9]{2}")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# C0/C1 control characters (newline, carriage return, tab, escape, ...) and the Unicode line separators
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# a Hydra override value that needs no quoting (anything else is passed as a quoted Hydra string)
HYDRA_PLAIN = re.compile(r"[A-Za-z0-9_/.:+@%-]+")


def template_path() -> Path:
    from aifactory_train.locations import config_dir

    installed = config_dir().parent / "slurm" / "sbatch.sh.j2"  # inside the package when installed
    return installed if installed.is_file() else Path(__file__).resolve().parents[2] / "slurm" / "sbatch.sh.j2"


def job_shape(cfg: dict[str, Any]) -> tuple[int, int, int]:
    """(nodes, tasks per node, GPUs per node) after checking them against the cluster profile."""
    cluster, trainer, strategy = cfg["cluster"], cfg["trainer"], cfg["strategy"]
    node_gpus = cluster["node"]["gpus"]
    devices = trainer["devices"]
    if devices == "auto":
        devices = node_gpus or 1
    if isinstance(devices, list):
        devices = len(devices)
    nodes = trainer["num_nodes"]
    if node_gpus and devices > node_gpus:
        raise ConfigError(f"trainer.devices={devices} but cluster '{cluster['name']}' nodes have {node_gpus} GPUs; "
                          f"use trainer.devices<={node_gpus} and more trainer.num_nodes (now {nodes})")
    if not node_gpus and trainer["accelerator"] in GPU_ACCELERATORS:
        raise ConfigError(f"trainer.accelerator={trainer['accelerator']} but cluster '{cluster['name']}' has no GPUs; "
                          f"choose a GPU cluster profile or trainer.accelerator=cpu")
    if strategy["name"] == "single" and nodes * devices > 1:
        raise ConfigError(f"strategy=single runs one process, but the job asks for {nodes} node(s) x {devices} "
                          f"device(s); use strategy=ddp (or trainer.devices=1 trainer.num_nodes=1)")
    from aifactory_train.records.config import GPU_STRATEGIES

    if not node_gpus and strategy["name"] in GPU_STRATEGIES and not strategy.get("cpu_smoke"):
        raise ConfigError(f"strategy={strategy['name']} shards over GPUs, but cluster '{cluster['name']}' has none; "
                          f"use strategy=ddp there, or strategy.cpu_smoke=true to check the config on CPU processes")
    minutes = (cfg.get("checkpoint") or {}).get("every_n_minutes")
    limit = _minutes(cluster["time_limit"])
    if minutes and limit is not None and minutes >= limit - cluster["requeue_signal_seconds"] / 60:
        raise ConfigError(f"checkpoint.every_n_minutes={minutes} but cluster.time_limit={cluster['time_limit']} "
                          f"(less the {cluster['requeue_signal_seconds']} s requeue warning) ends the job before the "
                          f"first checkpoint; checkpoint more often or ask for more time")
    if devices * cluster["cpus_per_task"] > cluster["node"]["cpus"]:
        raise ConfigError(f"cluster.cpus_per_task={cluster['cpus_per_task']} x trainer.devices={devices} exceeds the "
                          f"{cluster['node']['cpus']} CPUs of a '{cluster['name']}' node")
    if trainer.get("global_batch_size") is not None:  # devices: auto is the node's GPUs here, so check it now
        from aifactory_train.records.config import gradient_accumulation

        gradient_accumulation(trainer["global_batch_size"], (cfg.get("data") or {}).get("batch_size"), nodes * devices)
    return nodes, devices, (devices if node_gpus else 0)


def _minutes(time_limit: str | None) -> float | None:
    """Slurm's [days-]hh:mm:ss in minutes."""
    if not time_limit:
        return None
    days, _, clock = time_limit.rpartition("-")
    hours, minutes, seconds = (int(x) for x in clock.split(":"))
    return (int(days or 0) * 24 + hours) * 60 + minutes + seconds / 60


def _job_env(profile_env: dict[str, str]) -> dict[str, str]:
    """The profile's environment, plus the recipe folders of this submission ($AIFT_RECIPES_PATH, resolved), so
    the job finds a copied recipe also where sbatch does not pass the submitting shell's environment on."""
    from aifactory_train.locations import RECIPES_PATH_ENV, user_recipe_roots

    roots = user_recipe_roots()
    if not roots:
        return dict(profile_env)
    return {**profile_env, RECIPES_PATH_ENV: os.pathsep.join(str(root) for root in roots)}


def check_job_name(job_name: str) -> None:
    if not SLURM_NAME.fullmatch(job_name):
        raise ConfigError(f"--job-name {job_name!r} is not valid; a Slurm job name here is {SLURM_NAME_VALID}")


def check_run_dir(run_dir: str) -> None:
    # A backslash turns off Slurm's %x/%j in the log file names (and is an escape to Hydra); ${ is an interpolation
    # that Hydra would resolve into another folder than the one the logs go to.
    if CONTROL.search(run_dir) or "\\" in run_dir or "${" in run_dir:
        raise ConfigError(f"--run-dir {run_dir!r} is not valid; a run folder path may not contain control characters "
                          f"(newline, tab, ...), a backslash or '${{'")


def _strings(value: Any, key: str):
    if isinstance(value, dict):
        for name, item in value.items():
            yield from _strings(item, f"{key}.{name}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _strings(item, f"{key}[{index}]")
    elif isinstance(value, str):
        yield key, value


def check_script_values(cluster: dict[str, Any], account: str | None, shape: tuple[int, int, int],
                        env: dict[str, Any], overrides: list[str]) -> None:
    """Every value that reaches the job script, against what Slurm (and bash) accept; ConfigError names the first
    that does not."""
    from aifactory_train.records.config import check

    added = [(f"${name}", value) for name, value in env.items() if name not in cluster["env"]]  # $AIFT_RECIPES_PATH
    for key, value in [*_strings(cluster, "cluster"), *added]:
        check(not CONTROL.search(value), key, value, "no control characters (newline, tab, ...)")
    for override in overrides:
        if CONTROL.search(override):
            raise ConfigError(f"override {override!r} is not valid; an override may not contain control characters "
                              f"(newline, tab, ...)")
    check(isinstance(cluster["name"], str) and SLURM_NAME.fullmatch(cluster["name"]) is not None, "cluster.name",
          cluster["name"], SLURM_NAME_VALID)
    partition = cluster["partition"]
    check(isinstance(partition, str) and all(SLURM_NAME.fullmatch(p) for p in partition.split(",")),
          "cluster.partition", partition, f"a Slurm partition name ({SLURM_NAME_VALID}), or several separated by ,")
    if account is not None:
        check(isinstance(account, str) and SLURM_NAME.fullmatch(account) is not None,
              f"cluster.accounts.{cluster['allocation']}", account, f"a Slurm account name ({SLURM_NAME_VALID})")
    if cluster.get("qos") is not None:
        check(isinstance(cluster["qos"], str) and SLURM_NAME.fullmatch(cluster["qos"]) is not None, "cluster.qos",
              cluster["qos"], f"a Slurm QOS name ({SLURM_NAME_VALID})")
    check(isinstance(cluster["time_limit"], str) and SLURM_TIME.fullmatch(cluster["time_limit"]) is not None,
          "cluster.time_limit", cluster["time_limit"], "Slurm's [days-]hh:mm:ss")
    for key, value, least in [("trainer.num_nodes", shape[0], 1), ("trainer.devices", shape[1], 1),
                              ("cluster.node.gpus", shape[2], 0), ("cluster.cpus_per_task", cluster["cpus_per_task"], 1)]:
        check(type(value) is int and value >= least, key, value, f"a whole number >= {least}")
    seconds = cluster["requeue_signal_seconds"]
    check(type(seconds) is int and 0 <= seconds <= 65535, "cluster.requeue_signal_seconds", seconds,
          "a whole number of seconds from 0 to 65535 (Slurm's --signal)")
    for name in env:
        check(isinstance(name, str) and ENV_NAME.fullmatch(name) is not None, f"cluster.env.{name}", name,
              "an environment variable name: letters, digits and _, not starting with a digit")


def hydra_value(text: str) -> str:
    """``text`` as a Hydra override value that Hydra reads back unchanged: plain if it can be, else quoted (the
    callers refuse backslashes and ${, which Hydra would read as escapes and interpolations even in quotes)."""
    return text if HYDRA_PLAIN.fullmatch(text) else "'" + text.replace("'", "\\'") + "'"


def render(cfg: dict[str, Any], overrides: list[str], job_name: str, run_dir: Path) -> str:
    import jinja2

    cluster = cfg["cluster"]
    if cluster["scheduler"] != "slurm":
        raise ConfigError(f"cluster '{cluster['name']}' has scheduler '{cluster['scheduler']}'; `aift launch` needs a "
                          f"Slurm profile (cluster=aifactory_h100, cluster=slurm, or your own copy of slurm.yaml)")
    check_job_name(job_name)
    check_run_dir(str(run_dir))
    nodes, tasks, gpus = job_shape(cfg)
    from aifactory_train.records.tracks import job_account

    account = job_account(cluster)
    env = _job_env(cluster["env"])
    check_script_values(cluster, account, (nodes, tasks, gpus), env, overrides)
    # the exact training command: the user's overrides, the shape they resolved to, a fixed run folder and
    # ckpt_path=auto, so that a requeued job writes into and resumes from the same place
    pinned = [o for o in overrides if not o.split("=")[0] in ("trainer.devices", "trainer.num_nodes", "hydra.run.dir")]
    resume = [] if any(o.split("=")[0] == "ckpt_path" for o in overrides) else ["ckpt_path=auto"]
    command = ["aift", "train", *pinned, *resume, f"trainer.devices={tasks}", f"trainer.num_nodes={nodes}",
               f"hydra.run.dir={hydra_value(str(run_dir))}"]
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    environment.filters["shell_quote"] = lambda value: shlex.quote(str(value))
    # sbatch reads #SBATCH values with shell-like quotes; in --output/--error a literal % is written %%
    environment.filters["sbatch_path"] = lambda value: shlex.quote(str(value).replace("%", "%%"))
    template = environment.from_string(template_path().read_text())
    return template.render(
        cluster=cluster, job_name=job_name, account=account, requeue_signal=REQUEUE_SIGNAL_NAME,
        nodes=nodes, tasks_per_node=tasks, gpus_per_node=gpus, log_dir=run_dir / "slurm",
        env=env, command=" ".join(shlex.quote(part) for part in command),
    )


def compose(overrides: list[str], run_dir: Path):
    from aifactory_train.records.config import compose_train_config

    return compose_train_config(overrides, run_dir)


def sweep_points(overrides: list[str]) -> list[list[str]]:
    """The points of a Hydra sweep (``seed=1,2 optim.lr=range(1,3)``: 4 points), with Hydra's own override
    grammar; one point when nothing sweeps. (Hydra's BasicSweeper does the same product, but privately.)"""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for line in overrides:  # one at a time, to name the one that does not parse
        try:
            parser.parse_override(line)
        except HydraException as err:
            reasons = [r for r in str(err).splitlines() if r.strip() and not r.startswith(("Error parsing", "See "))]
            raise ConfigError(f"override {line!r} cannot be parsed ({reasons[0] if reasons else 'syntax error'}); "
                              f"overrides are KEY=VALUE in Hydra's grammar, e.g. trainer.max_epochs=5") from None
    points: list[list[str]] = [[]]
    for override in parser.parse_overrides(overrides):
        if override.is_sweep_override():
            key = override.get_key_element()
            values = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            values = [override.input_line]
        points = [point + [value] for point in points for value in values]
    return points


def prepare_tracking(tracking_cfgs: list[dict[str, Any]]) -> None:
    """Before any job is queued: the tracking store answers, and it has the experiments the jobs log into. A
    store that cannot be used fails here, not on the nodes; and jobs that start together (a sweep) do not race to
    create a new sqlite store or experiment."""
    from aifactory_train.records.tracking import check_tracking_uri, ensure_experiment

    for uri, experiment in sorted({(t["uri"], t["experiment"]) for t in tracking_cfgs if t["backend"] == "mlflow"}):
        check_tracking_uri(uri)
        ensure_experiment(uri, experiment)


def launch(overrides: list[str], dry_run: bool, job_name: str | None, run_dir: str | None,
           multirun: bool = False, data_check: bool = True, ignore_plan: bool = False) -> int:
    """Submit one job, or with ``multirun`` one job per sweep point (run folders <run_dir>/<i>). Every point is
    composed and validated, and (unless ``data_check`` is off or this is a dry run) its data files checked,
    before the first is submitted: a job should not wait in the queue only to find no data."""
    from omegaconf import OmegaConf

    from aifactory_train.records.config import check_data, validate

    if job_name is not None:
        check_job_name(job_name)
    if run_dir is not None:
        check_run_dir(run_dir)
    points = sweep_points(overrides)
    if len(points) > 1 and not multirun:
        sweeping = [o for o in overrides if o not in points[0]]
        raise AiftError(f"{' '.join(sweeping)}: a sweep ({len(points)} points); add -m to submit one job per point, "
                        f"or give one value")
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    recipe = next((o.split("=", 1)[1] for o in overrides if o.startswith("recipe=")), default_recipe())
    job_name = job_name or "aift-" + re.sub(r"[^A-Za-z0-9_.+-]", "_", recipe)  # a recipe sweep (a,b) too
    base = Path(run_dir or f"outputs/{recipe}/{stamp}").resolve()
    jobs, typed_configs, plans = [], [], {}
    for index, point in enumerate(points):
        run_path = base / str(index) if multirun else base
        cfg = compose(point, run_path)
        typed_configs.append(validate(cfg))
        resolved = OmegaConf.to_container(cfg, resolve=True)
        jobs.append((point, resolved, run_path, render(resolved, point, job_name, run_path)))
    from aifactory_train.launch.accounts import check_job_account, job_account

    starts = [start_of(resolved) for _, resolved, _, _ in jobs]  # a bad window or grid file: before the data is read
    if not dry_run:
        from aifactory_train.records.usage_terms import os_user

        for _, resolved, _, _ in jobs:  # the account exists in the cluster's accounting, with this user in it
            check_job_account(resolved["cluster"], os_user())
    if data_check and not dry_run:
        for typed, (_, resolved, _, _) in zip(typed_configs, jobs):
            # relative paths resolve as in the job: sbatch starts it in this folder; the data owner's terms are
            # checked against the account the job will be charged to
            check_data(typed, account=job_account(resolved["cluster"]), queued=True)
        from aifactory_train.data.data_check import cheap_data_check

        for _, resolved, _, _ in jobs:  # after every point's files: counts and leakage need the data read
            cheap_data_check(resolved, queued=True)  # (the terms with the job's account, as above)
    sbatch = None if dry_run else shutil.which("sbatch")
    if not dry_run and sbatch is None:
        raise AiftError("sbatch was not found on PATH: this machine is not a Slurm login node. "
                        "`aift launch --dry-run ...` prints the script and the resolved config without submitting")
    from aifactory_train.launch.plan import check_launch

    for index, (point, resolved, run_path, script) in enumerate(jobs):  # after the cheaper checks: it builds the model
        script, plans[run_path] = check_launch(resolved, script, ignore_plan)  # refused here unless --ignore-plan
        jobs[index] = (point, resolved, run_path, script)
    if dry_run:
        from aifactory_train.records.masking import redact_text, redacted

        for (point, resolved, run_path, script), start in zip(jobs, starts):  # shown, not run: passwords masked
            if multirun:
                print(redact_text(f"# point {run_path.name}: {' '.join(point)}"))
            print(OmegaConf.to_yaml(redacted(resolved)))
            print(redact_text(script))
            if start is not None:
                print(describe_start(start))
        return 0
    prepare_tracking([resolved["tracking"] for _, resolved, _, _ in jobs])
    for (point, _, run_path, script), start in zip(jobs, starts):
        (run_path / "slurm").mkdir(parents=True, exist_ok=True)
        script_path = run_path / "launch.sbatch"
        # owner-only: the job script carries the overrides as given, a tracking URI's password included (the
        # MLflow environment variables keep it out of the script altogether)
        script_path.unlink(missing_ok=True)
        with os.fdopen(os.open(script_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
            out.write(script)
        if plans.get(run_path) is not None:  # the plan the job was checked against (and any --ignore-plan)
            (run_path / "plan.json").write_text(json.dumps(plans[run_path], indent=2, default=str) + "\n")
        begin = [f"--begin={start.sbatch_begin()}"] if start is not None else []
        result = subprocess.run([sbatch, "--parsable", *begin, str(script_path)], capture_output=True, text=True)
        if result.returncode != 0:
            raise AiftError(f"sbatch refused the job ({result.returncode}): {result.stderr.strip()}; script: {script_path}")
        job_id = result.stdout.strip().split(";")[0]
        if multirun:
            from aifactory_train.records.masking import redact_text

            print(f"point {run_path.name}: {redact_text(' '.join(point))}")
        print(f"submitted job {job_id}")
        if start is not None:
            print(describe_start(start))
        print(f"logs: {run_path / 'slurm'}/{job_name}-{job_id}.out (and .err)")
        print(f"run folder: {run_path}")
    return 0


def start_of(resolved: dict[str, Any]):
    """The job's StartChoice for launch.start=offpeak|grid (None: now), over the job's time limit."""
    mode = (resolved.get("launch") or {}).get("start", "now")
    if mode == "now":
        return None
    from aifactory_train.launch.start_window import choose_start

    return choose_start(resolved["cluster"], None, mode=mode)


def describe_start(start) -> str:
    saving = f"; mean grid signal {start.signal_begin:.4g} vs {start.signal_now:.4g} now ({start.saving:+.1%} saved)" \
        if start.saving is not None else ""
    return f"begins: {start.local_begin().isoformat(timespec='minutes')} (launch.start={start.mode}: {start.why}{saving})"
