"""The facility's allocation tracks as Slurm accounts.

The cluster profile (configs/cluster/*.yaml) names the tracks and their accounts (``accounts``: euro_hpc ->
aif-eurohpc, ...), their fair-share (``shares``: 50/25/25), and the projects, each a Slurm sub-account under its
track's account (``projects``: name -> track and users). ``aift cluster accounts cluster=NAME`` makes Slurm's
association tree match, with ``sacctmgr`` (idempotent: it adds what is missing and sets what differs, it deletes
nothing); a job of ``cluster.project=P`` is charged to P, so Slurm's fair-share and ``sacct`` count it under its
track. A project the profile does not list, or one that the cluster's accounting does not know, is refused before
anything is queued.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from aifactory_train.errors import AiftError, ConfigError
from aifactory_train.records.tracks import _get, _track_of, check_tracks, job_account  # noqa: F401 - re-exported


def _sacctmgr(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    sacctmgr = shutil.which("sacctmgr")
    if sacctmgr is None:
        raise AiftError("sacctmgr was not found on PATH: run this on the cluster's login or admin node")
    result = subprocess.run([sacctmgr, *args], capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        why = (result.stderr.strip() or result.stdout.strip()).splitlines()
        raise AiftError(f"sacctmgr {' '.join(args)} failed: {why[-1] if why else result.returncode}")
    return result


@dataclass(frozen=True)
class Association:
    account: str
    parent: str
    user: str
    fairshare: str


def associations() -> list[Association]:
    """Slurm's association tree of this cluster (sacctmgr show assoc)."""
    out = _sacctmgr("-n", "-P", "show", "assoc", "format=Account,ParentName,User,Fairshare").stdout
    rows = []
    for line in out.splitlines():
        account, parent, user, share = (line.split("|") + ["", "", "", ""])[:4]
        rows.append(Association(account, parent, user, share))
    return rows


def account_actions(cluster: dict[str, Any], existing: list[Association]) -> list[list[str]]:
    """The sacctmgr commands that make the association tree match the profile; [] when it does."""
    check_tracks(cluster)
    account_rows = {a.account: a for a in existing if not a.user}
    users = {(a.account, a.user) for a in existing if a.user}
    shares = cluster.get("shares") or {}
    wanted: list[tuple[str, str, int, str]] = []  # account, parent, fairshare, description
    for track, account in (cluster.get("accounts") or {}).items():
        if account is not None:
            wanted.append((account, "root", shares.get(track, 1), f"track {track}"))
    for name, project in (cluster.get("projects") or {}).items():
        wanted.append((name, cluster["accounts"][project["track"]], 1, f"project of track {project['track']}"))
    actions = []
    for account, parent, share, description in wanted:
        row = account_rows.get(account)
        if row is None:
            actions.append(["add", "account", account, f"parent={parent}", f"fairshare={share}",
                            f"description={description}", f"organization={account}"])
            continue
        if row.parent != parent:
            actions.append(["modify", "account", "where", f"name={account}", "set", f"parent={parent}"])
        if row.fairshare != str(share):
            actions.append(["modify", "account", "where", f"name={account}", "set", f"fairshare={share}"])
    for name, project in (cluster.get("projects") or {}).items():
        for user in project.get("users") or []:
            if (name, user) not in users:
                actions.append(["add", "user", user, f"account={name}"])
    return actions


def apply_accounts(cluster: dict[str, Any], dry_run: bool = False) -> list[str]:
    """Run the sacctmgr commands of ``account_actions`` (``-i``: without its confirmation prompt); returns them as
    printed command lines."""
    actions = account_actions(cluster, associations())
    for action in actions:
        if dry_run:
            continue
        result = _sacctmgr("-i", *action, check=False)
        # "Nothing new added": another admin (or a second run at the same moment) added it first: what was wanted
        if result.returncode != 0 and "Nothing new added" not in result.stdout + result.stderr:
            why = (result.stderr.strip() or result.stdout.strip()).splitlines()
            raise AiftError(f"sacctmgr {' '.join(action)} failed: {why[-1] if why else result.returncode}")
    import shlex

    return [shlex.join(["sacctmgr", "-i", *action]) for action in actions]


def accounting_available() -> bool:
    """Whether this cluster keeps accounts (slurmdbd answers sacctmgr); False without Slurm or accounting."""
    if shutil.which("sacctmgr") is None:
        return False
    result = _sacctmgr("-n", "-P", "show", "cluster", "format=Cluster", check=False)
    return result.returncode == 0 and bool(result.stdout.strip())


def check_job_account(cluster: dict[str, Any], user: str) -> None:
    """Before anything is queued: where the cluster keeps accounts, the job's account exists and ``user`` is in it
    (Slurm would refuse the job at sbatch, with enforced associations; here the message says how to fix it)."""
    account = job_account(cluster)
    if account is None or not accounting_available():
        return
    rows = [a for a in associations() if a.account == account]
    where = (f"project '{account}'" if cluster.get("project")
             else f"track {cluster.get('allocation')}'s account '{account}'")
    if not rows:
        raise ConfigError(f"cluster.project/allocation: {where} has no Slurm account on this cluster; a facility "
                          f"admin creates it with `aift cluster accounts cluster={cluster.get('name')}`")
    if not any(a.user == user for a in rows):
        raise ConfigError(f"cluster.project/allocation: user '{user}' is not in {where} on this cluster; a facility "
                          f"admin adds the user under cluster.projects.{account}.users and runs `aift cluster "
                          f"accounts cluster={cluster.get('name')}`")


def load_profile(overrides: list[str]) -> dict[str, Any]:
    """A cluster profile for the admin commands (aift cluster accounts, aift usage), without composing a recipe:
    ``cluster=NAME`` (configs/cluster/NAME.yaml, or a path to a YAML file) and ``cluster.KEY=VALUE`` overrides,
    checked against ClusterConfig like a training config's."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from aifactory_train.records.config import ClusterConfig, _check_tree
    from aifactory_train.locations import config_dir

    name, rest = None, []
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not (key == "cluster" or key.startswith("cluster.")):
            raise ConfigError(f"override {override!r} is not valid here; give cluster=NAME and cluster.KEY=VALUE")
        if key == "cluster":
            name = value
        else:
            rest.append(f"{key[len('cluster.'):]}={value}")
    if name is None:
        raise ConfigError("no cluster profile: give cluster=NAME (a file of configs/cluster/, e.g. aifactory_h100)")
    from pathlib import Path

    path = Path(name) if name.endswith((".yaml", ".yml")) else config_dir() / "cluster" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (config_dir() / "cluster").glob("*.yaml"))
        raise ConfigError(f"cluster={name}: no such profile ({path}); known: {', '.join(known)}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ClusterConfig), OmegaConf.load(path), OmegaConf.from_dotlist(rest))
        typed = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"cluster profile {path}: key 'cluster.{getattr(err, 'full_key', '?')}': "
                          f"{str(err).splitlines()[0]}") from None
    _check_tree(typed)
    return OmegaConf.to_container(merged, resolve=True)
