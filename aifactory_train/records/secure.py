"""``profile=secure``: one switch, for every recipe, for data that must not leave the run.

It is required (the run is refused before anything is written, naming the card and what to add) where

* a data card covering the data says ``sensitivity: high``, or
* the recipe declares ``recipe.secure_unless_card: KEY`` and the nearest card at ``data.root`` does not say
  ``KEY: true`` (the text recipe declares ``deidentified``: notes not marked de-identified, e.g. de-identified
  inline with ``data.deidentify=inline``, are trained on under the profile only).

Under the profile (``profile.name: secure``):

* tracking goes only to a local store (``sqlite:///``, ``file:``, a path) or to a host that every card with a
  ``usage.tracking`` list allows (and at least one card must list it); anything else is refused before anything is
  written;
* ``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE`` and ``TRANSFORMERS_OFFLINE`` are set to 1 in the process, so its
  workers inherit them;
* network egress from Python code in the process is refused, except to loopback and the allowlisted tracking
  host: an audit hook (PEP 578, ``sys.addaudithook``) on ``socket.connect``, ``socket.sendto``,
  ``socket.getaddrinfo`` and ``socket.gethostbyname`` raises :class:`EgressRefused` naming the address. The hook is copied into forked children
  (DataLoader workers); a run started anew (Lightning's DDP ranks) installs it again when it starts. Native
  libraries' sockets (NCCL, gloo, the TCPStore of torch.distributed) are not Python calls and are not seen: the
  ranks of a multi-node job still talk to each other; the cluster's secure partition is what fences those;
* files are written owner-only (umask 077; the run folder, and what Hydra wrote in it before, to 0700/0600);
* a recipe's sample logging (the generic key ``recipe.module.log_samples``, which a recipe that writes data samples
  to its reports and MLflow honours) must be off;
* temporary files go to a private folder (``TMPDIR``, mode 0700) per run, removed when the command ends, also
  after a failure;
* `aift launch` submits to the cluster profile's ``secure_partition`` and refuses a profile without one.

What it does not do: stop code that is not Python's socket module (a C extension's own sockets), or someone who
edits aift; the file system's access control decides who may read the data at all.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

from aifactory_train.errors import AiftError, ConfigError, DataError

log = logging.getLogger(__name__)

PROFILES = ("default", "secure")
SECURE = "secure"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
SAMPLE_LOGGING_KEY = "log_samples"  # recipe.module.log_samples: the generic switch of a recipe's sample logging
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")
LOCAL_SCHEMES = ("", "file", "sqlite")


@dataclass
class ProfileConfig:
    """The ``profile`` config group: ``profile=secure`` (configs/profile/secure.yaml) switches it on."""

    name: str = "default"

    def check(self) -> None:
        if self.name not in PROFILES:
            raise ConfigError(f"config key 'profile.name': '{self.name}' is not valid; valid: "
                              f"{', '.join(PROFILES)} (give profile=secure)")


class EgressRefused(AiftError):
    """A network connection refused under ``profile=secure``."""


# -- reading a config of any shape (the typed dataclasses, a resolved dict, an OmegaConf node) -------------------
def _get(config: Any, *keys: str, default: Any = None) -> Any:
    node = config
    for key in keys:
        if node is None:
            return default
        node = node.get(key) if isinstance(node, dict) else getattr(node, key, None)
    return default if node is None else node


def is_secure(config: Any) -> bool:
    return _get(config, "profile", "name", default="default") == SECURE


# -- when the profile is required --------------------------------------------------------------------------------
def required_by(cards: list[Path], config: Any, recipe_rule: bool = True) -> list[str]:
    """Why the data needs ``profile=secure``: one reason per card (naming it); [] when it does not. ``recipe_rule``:
    also the recipe's ``recipe.secure_unless_card`` against the card at ``data.root`` (training and eval data)."""
    from aifactory_train.records.usage_terms import load_datacard

    reasons = []
    for path in cards:
        level = load_datacard(path).get("sensitivity")
        if str(level).strip().lower() == "high":
            reasons.append(f"data card '{path}' marks the data sensitivity: high")
    key = _get(config, "recipe", "secure_unless_card")
    root = _get(config, "data", "root")
    if key and root is not None and recipe_rule:
        from aifactory_train.records.usage_terms import datacards_for

        nearest = datacards_for(root)[:1]
        marked = nearest and str(load_datacard(nearest[0]).get(key, "")).strip().lower() == "true"
        if not marked:
            where = f"data card '{nearest[0]}'" if nearest else f"data.root '{root}' (no data card)"
            reasons.append(f"{where} does not mark the data {key}: true, and recipe {_get(config, 'recipe', 'name')} "
                           f"uses such data only under the secure profile (recipe.secure_unless_card: {key})")
    return reasons


# -- tracking -----------------------------------------------------------------------------------------------------
def _host_of(entry: str) -> str:
    """The host name of an allowlist entry: ``mlflow.umcg.nl``, ``mlflow.umcg.nl:5000`` or a URL."""
    entry = entry.strip()
    if "://" in entry:
        return (urlsplit(entry).hostname or "").lower()
    if entry.startswith("["):  # [::1]:5000
        return entry[1:].split("]")[0].lower()
    return entry.rsplit(":", 1)[0].lower() if entry.count(":") == 1 else entry.lower()


def is_loopback(host: str | None) -> bool:
    if host is None or host == "":
        return True
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tracking_allowlist(cards: list[Path]) -> tuple[list[str] | None, list[str]]:
    """The hosts every card with a ``usage.tracking`` list allows (None: no card lists one), and those cards."""
    from aifactory_train.records.usage_terms import card_terms

    allowed: set[str] | None = None
    listing = []
    for path in cards:
        for terms in card_terms(path):
            if terms.tracking is not None:
                hosts = {_host_of(h) for h in terms.tracking}
                allowed = hosts if allowed is None else allowed & hosts
                listing.append(str(path))
    return (None if allowed is None else sorted(allowed)), listing


def check_tracking(config: Any, cards: list[Path]) -> str | None:
    """Refuse a tracking store the secure profile does not allow; the allowlisted host it uses (None: local)."""
    from aifactory_train.records.masking import redact_uri

    if _get(config, "tracking", "backend") != "mlflow":
        return None
    uri = str(_get(config, "tracking", "uri", default=""))
    parts = urlsplit(uri)
    scheme = parts.scheme.lower().split("+")[0]
    if scheme in LOCAL_SCHEMES or (len(scheme) == 1 and uri[1:2] == ":"):  # a path, file:, sqlite:///
        return None
    host = (parts.hostname or "").lower()
    if host and is_loopback(host):
        return None  # (a URI without a host that is not a local store, databricks://profile, is not local)
    allowed, listing = tracking_allowlist(cards)
    if allowed and host in allowed:
        return host
    named = f"data card(s) {', '.join(repr(c) for c in listing)} allow usage.tracking {allowed}" if listing else \
        (f"no data card ({', '.join(repr(str(c)) for c in cards) or 'none found'}) lists a usage.tracking host"
         if cards else "no data card lists a usage.tracking host")
    raise ConfigError(f"config key 'tracking.uri': '{redact_uri(uri)}' is not allowed under profile=secure: "
                      f"{named}; valid: a local store (sqlite:///PATH, file:PATH), a loopback server, or a host the "
                      f"data owner adds to usage.tracking in the card")


def check_sample_logging(config: Any) -> None:
    value = _get(config, "recipe", "module", SAMPLE_LOGGING_KEY)
    if value not in (None, 0, False):
        raise ConfigError(f"config key 'recipe.module.{SAMPLE_LOGGING_KEY}': {value!r} is not allowed under "
                          f"profile=secure (it writes data samples to the reports and MLflow); valid: 0")


def check_profile(config: Any, record: dict[str, Any] | None, cards: list[Path] | None = None,
                  recipe_rule: bool = True) -> None:
    """Before anything is read, written or queued: refuse data that needs ``profile=secure`` without it, and under
    it a tracking store or sample logging it does not allow. The outcome goes into ``record`` (the usage record:
    summary.json's ``usage_check``, the MLflow tags)."""
    try:
        _check_profile(config, record, cards, recipe_rule)
    except (DataError, ConfigError) as err:
        from aifactory_train.records import audit

        audit.note_check(config, record=record, refusal=err)  # the audit line says refused, and why
        raise


def _check_profile(config: Any, record: dict[str, Any] | None, cards: list[Path] | None, recipe_rule: bool) -> None:
    if cards is None:
        cards = [Path(c["path"]) for c in (record or {}).get("cards", [])]
    reasons = required_by(cards, config, recipe_rule)
    if reasons and not is_secure(config):
        raise DataError(f"{reasons[0]}: it may be used under profile=secure only; add profile=secure to the command"
                        + (f" ({len(reasons) - 1} more card(s) say so)" if len(reasons) > 1 else ""))
    if not is_secure(config):
        if record is not None:
            record["profile"] = {"name": "default"}
        return
    host = check_tracking(config, cards)
    check_sample_logging(config)
    if record is not None:
        record["profile"] = {"name": SECURE, "required_by": reasons, "tracking_host": host,
                             "egress": ["loopback", *([host] if host else [])]}


def samples_withheld(config: Any) -> str | None:
    """Why a report must show no data samples (`aift data check`'s contact sheet): under ``profile=secure``, or for
    data a card marks ``sensitivity: high``; None when samples may be shown."""
    if is_secure(config):
        return "profile=secure: no data samples are shown"
    data = _get(config, "data")
    if data is None or _get(data, "root") is None:
        return None
    from aifactory_train.records.usage_terms import data_paths, datacards_for

    reasons = required_by(datacards_for(data_paths(data)), config, recipe_rule=False)
    return f"{reasons[0]}: no data samples are shown" if reasons else None


def job_partition(cluster: dict[str, Any], config: Any) -> str:
    """The Slurm partition a job goes to: the profile's ``secure_partition`` under ``profile=secure``."""
    if not is_secure(config):
        return cluster["partition"]
    partition = cluster.get("secure_partition")
    if not partition:
        raise ConfigError(f"config key 'cluster.secure_partition': cluster profile '{cluster.get('name')}' has none, "
                          f"and profile=secure runs only on the secure partition; valid: a cluster profile with "
                          f"secure_partition: NAME (configs/cluster/*.yaml), or cluster.secure_partition=NAME")
    return partition


# -- in the running process ---------------------------------------------------------------------------------------
@dataclass
class _Policy:
    hosts: set[str] = field(default_factory=set)  # allowlisted names (lower case)
    addresses: set[str] = field(default_factory=set)  # and their addresses


_POLICY: _Policy | None = None
_HOOKED = False


def _address_allowed(address: Any) -> bool:
    policy = _POLICY
    if policy is None:
        return True
    if not isinstance(address, tuple) or not address:
        return True  # an AF_UNIX path, an abstract socket: not the network
    host = address[0]
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host).split("%")[0]
    return is_loopback(host) or host.lower() in policy.hosts or host in policy.addresses


def _name_allowed(host: Any) -> bool:
    policy = _POLICY
    if policy is None or host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host)
    return (is_loopback(host) or host.lower() in policy.hosts or host in policy.addresses
            or host == _kernel_host())


def _kernel_host() -> str:
    import socket

    return socket.gethostname()


def _refused(what: str) -> EgressRefused:
    return EgressRefused(f"profile=secure: {what} refused; only loopback"
                         f"{' and ' + ', '.join(sorted(_POLICY.hosts)) if _POLICY.hosts else ''} may be reached "
                         f"from a secure run (a tracking host must be listed in the data card's usage.tracking)")


def _audit(event: str, args: tuple) -> None:
    # each socket call raises an audit event (PEP 578): refuse the network ones outside the policy
    if _POLICY is None:
        return
    if event in ("socket.connect", "socket.sendto"):
        if not _address_allowed(args[1]):
            raise _refused(f"network connection to {_shown(args[1])}")
    elif event in ("socket.getaddrinfo", "socket.gethostbyname"):
        if not _name_allowed(args[0]):
            raise _refused(f"network lookup of '{args[0]}'")


def _shown(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return repr(address)


def refuse_egress(hosts: list[str]) -> None:
    """From now on (and in forked children), Python sockets reach only loopback and ``hosts``."""
    global _POLICY, _HOOKED
    import socket

    policy = _Policy(hosts={h.lower() for h in hosts})
    for host in hosts:  # resolved now, before the hook would refuse the lookup
        try:
            policy.addresses.update(info[4][0] for info in socket.getaddrinfo(host, None))
        except OSError:
            log.warning("profile=secure: the allowlisted tracking host '%s' does not resolve", host)
    if not _HOOKED:  # an audit hook cannot be removed; it does nothing while no policy is set
        sys.addaudithook(_audit)
        _HOOKED = True
    _POLICY = policy


def allow_egress() -> None:
    """The policy lifted (the end of an in-process command; a new process starts without one)."""
    global _POLICY
    _POLICY = None


def _owner_only(run_dir: Path) -> None:
    """What Hydra wrote before the profile was on (its config record, the log) made owner-only."""
    if not run_dir.is_dir():
        return
    run_dir.chmod(0o700)
    for folder, dirs, files in os.walk(run_dir):
        for name in dirs:
            (Path(folder) / name).chmod(0o700)
        for name in files:
            path = Path(folder) / name
            if not path.is_symlink():
                path.chmod(path.stat().st_mode & 0o700)


def _offline_in_loaded_libraries() -> None:
    """The variables are read when huggingface_hub and datasets are imported; where they already are, set the
    constants they read them into."""
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_DATASETS_OFFLINE = True
        if hasattr(datasets_config, "HF_HUB_OFFLINE"):
            datasets_config.HF_HUB_OFFLINE = True


@contextmanager
def secure_profile(config: Any, run_dir: Path) -> Iterator[dict[str, Any] | None]:
    """Around a command (train, eval, predict, export): under ``profile=secure``, the tracking store checked, the
    process offline for Hugging Face, its Python sockets fenced, files owner-only and temporary files in a private
    folder that is removed at the end, also after a failure. Without the profile it does nothing."""
    if not is_secure(config):
        yield None
        return
    from aifactory_train.records.usage_terms import data_paths, datacards_for

    data = _get(config, "data")
    cards = datacards_for(data_paths(data)) if data is not None and _get(data, "root") is not None else []
    host = check_tracking(config, cards)
    check_sample_logging(config)
    saved_env = {k: os.environ.get(k) for k in (*OFFLINE_VARIABLES, "TMPDIR")}
    saved_umask = os.umask(0o077)
    saved_tempdir = tempfile.tempdir
    owner = os.getpid()
    private = Path(tempfile.mkdtemp(prefix=f"aift-secure-{run_dir.name}-"))  # mode 0700
    try:
        _owner_only(Path(run_dir))
        for name in OFFLINE_VARIABLES:
            os.environ[name] = "1"
        _offline_in_loaded_libraries()
        os.environ["TMPDIR"] = str(private)
        tempfile.tempdir = str(private)
        refuse_egress([host] if host else [])
        log.info("profile=secure: offline, network to loopback%s only, owner-only files, temporary files in %s",
                 f" and {host}" if host else "", private)
        yield {"tmpdir": str(private), "tracking_host": host}
    finally:
        if os.getpid() == owner:  # not in a forked child that returns through here
            allow_egress()
            shutil.rmtree(private, ignore_errors=True)
            tempfile.tempdir = saved_tempdir
            os.umask(saved_umask)
            for name, value in saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
