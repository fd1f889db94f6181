"""A cluster profile's allocation tracks (Slurm accounts with fair-share) and projects (their sub-accounts): the
rules that tie them together, checked with the config, and which account a job is charged to. Creating the accounts
in Slurm is `aift cluster accounts` (launch/accounts.py)."""

from __future__ import annotations

from typing import Any

from aifactory_train.errors import ConfigError
from aifactory_train.slurm_env import SLURM_NAME, SLURM_NAME_VALID


def _get(cluster: Any, key: str, default: Any = None) -> Any:
    """A key of the profile, typed (ClusterConfig) or plain (the resolved dict)."""
    return cluster.get(key, default) if isinstance(cluster, dict) else getattr(cluster, key, default)


def _track_of(project: Any) -> Any:
    return _get(project, "track")


def check_tracks(cluster: Any) -> None:
    """The profile's tracks, shares and projects hang together; ConfigError names the first key that does not."""
    from aifactory_train.records.config import check

    accounts = _get(cluster, "accounts") or {}
    tracks = ", ".join(accounts) or "none defined"
    for track, share in (_get(cluster, "shares") or {}).items():
        check(track in accounts, f"cluster.shares.{track}", track, f"a track of cluster.accounts ({tracks})")
        check(type(share) is int and share >= 1, f"cluster.shares.{track}", share, "a whole number >= 1 (Slurm's fairshare)")
    projects = _get(cluster, "projects") or {}
    for name, project in projects.items():
        check(SLURM_NAME.fullmatch(str(name)) is not None, f"cluster.projects.{name}", name,
              f"a Slurm account name ({SLURM_NAME_VALID})")
        track = _track_of(project)
        check(track in accounts and accounts.get(track) is not None, f"cluster.projects.{name}.track", track,
              f"a track of cluster.accounts that has an account ({', '.join(t for t, a in accounts.items() if a)})")
    project = _get(cluster, "project")
    if project is not None:
        if project not in projects:
            raise ConfigError(f"cluster.project '{project}' is not a project of cluster '{_get(cluster, 'name')}' "
                              f"(its projects: {', '.join(projects) or 'none'}); a facility admin adds it under "
                              f"cluster.projects and runs `aift cluster accounts cluster={_get(cluster, 'name')}`")
        track = _track_of(projects[project])
        check(track == _get(cluster, "allocation"), "cluster.allocation", _get(cluster, "allocation"),
              f"{track}: project '{project}' belongs to track {track} (give cluster.allocation={track})")


def job_account(cluster: dict[str, Any]) -> str | None:
    """The Slurm account a job of this profile is charged to: its project's sub-account, else its track's account
    (None: the user's default account)."""
    if cluster.get("project"):
        return cluster["project"]
    return (cluster.get("accounts") or {}).get(cluster.get("allocation"))
