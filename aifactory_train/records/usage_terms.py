"""The data owner's terms: which data cards cover a use of data, what they allow, and who, where and what is using it.

Every command that reads data (`aift train`, `eval`, `predict`, `launch`, `aift data deidentify`) calls
``check_usage`` before it reads, tracks or queues anything. It

* finds the cards: every ``datacard.yaml`` at or above each data path, after the path is resolved (symlinks and
  ``..`` followed), so a subfolder, a symlink or a path spelled with ``..`` is covered by the same cards as the
  data it leads to; all of them apply, the nearest one's fields describe the data;
* takes the identity of the use from the operating system, never from a config key or an environment variable:
  the user from the process's uid (``getpass.getuser()`` would read ``$USER``), the host from the kernel, and the
  Slurm job, node and account from slurmd and slurmctld (``scontrol pidinfo`` of this process, then ``squeue``/
  ``sinfo``), only where those prove that this process runs in a job of this user on this machine;
* takes the recipe from the code that runs (the package of ``recipe.module._target_``), and refuses a
  ``recipe.name`` that says otherwise;
* warns, and records, when no card states consent or terms.

What it does not stop: someone who edits aift's code, runs their own Python on the data, or copies the files; who
may read the data at all is the file system's access control.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from aifactory_train.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DATACARD_FILE = "datacard.yaml"
USAGE_KEYS = ("recipes", "users", "accounts", "hosts", "until")


# -- the cards -------------------------------------------------------------------------------------------------
def load_datacard(path: str | Path) -> dict[str, Any]:
    """The mapping in the card file ``path``; DataError naming the file when it is not one."""
    import yaml

    class CardLoader(yaml.SafeLoader):
        """Dates stay text: PyYAML turns ``2027-02-30`` into a ValueError with no key or file; as text it reaches
        parse_usage, which names the card, the key and the value."""

    CardLoader.add_constructor("tag:yaml.org,2002:timestamp", lambda loader, node: loader.construct_scalar(node))
    path = Path(path)
    try:
        card = yaml.load(path.read_text(), Loader=CardLoader) or {}  # noqa: S506 - a SafeLoader subclass
    except UnicodeDecodeError as err:
        raise DataError(f"data card '{path}' is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except yaml.YAMLError as err:
        raise DataError(f"data card '{path}' is not valid YAML: {err}") from None
    except OSError as err:
        raise DataError(f"data card '{path}' cannot be read ({err.strerror}); the owner's terms must be readable "
                        f"to use the data") from None
    if not isinstance(card, dict):
        raise DataError(f"data card '{path}' must be a mapping (owner, license, consent, usage, ...), not "
                        f"{type(card).__name__}")
    return card


def datacards_for(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Every data card that covers ``paths`` (files or folders): each ``datacard.yaml`` in the resolved folder of a
    path and in every folder above it, nearest first, each once."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    cards: list[Path] = []
    seen: set[Path] = set()
    for path in paths:
        resolved = Path(path).resolve()  # symlinks and `..` followed: the cards of where the bytes are
        folder = resolved if resolved.is_dir() else resolved.parent
        for candidate in (folder, *folder.parents):
            if candidate in seen:
                break  # this folder and those above it were looked at for an earlier path
            seen.add(candidate)
            if (candidate / DATACARD_FILE).is_file():
                cards.append(candidate / DATACARD_FILE)
    return cards


def data_paths(data: Any) -> list[Path]:
    """The paths a data config points at: ``root``, and the files its ``splits``/``manifest`` name (relative to
    the root, or absolute), so that a split spelled ``../other/train.jsonl`` is covered by the cards of where it is."""
    root = Path(str(data["root"] if isinstance(data, dict) else data.root))
    paths = [root]
    for key in ("splits", "manifest"):
        section = data.get(key) if isinstance(data, dict) else getattr(data, key, None)
        values = section.values() if isinstance(section, dict) else []
        for value in values:
            for item in (value.values() if isinstance(value, dict) else [value]):
                # a named file brings the cards of its own folder and those above it (a card in root/sub/ covers
                # root/sub/train.jsonl); a default name of a format not in use (a manifest file that is not
                # there, inside the root) adds nothing
                if isinstance(item, str) and item and ((root / item).exists() or
                                                       not _is_within((root / item).resolve(), root.resolve())):
                    paths.append(root / item)
    return paths


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


@dataclass
class UsageTerms:
    """What the data owner allows, from a data card's ``usage`` section; a key left out allows everything.

    ``recipes``: the purposes (recipe names) the data may be used for; ``users``: the login names that may use
    it; ``accounts``: the Slurm accounts (projects) whose jobs may use it; ``hosts``: where it may be used
    (node-name patterns, ``gcn*``: a copy on a laptop is refused); ``until``: the last day it may be used (the
    end of the agreement or consent). ``path``: the card they come from; ``via``: for terms a derived dataset
    carries from its source (``derived_from``), which source card stated them."""

    path: Path
    recipes: list[str] | None = None
    users: list[str] | None = None
    accounts: list[str] | None = None
    hosts: list[str] | None = None  # fnmatch patterns
    until: Any = None  # datetime.date
    via: str | None = None

    def describe(self) -> str:
        parts = [f"{key}={','.join(getattr(self, key))}" for key in ("recipes", "users", "accounts", "hosts")
                 if getattr(self, key) is not None]
        if self.until is not None:
            parts.append(f"until={self.until.isoformat()}")
        return "; ".join(parts) or "no restrictions"

    def as_dict(self) -> dict[str, Any]:
        """The terms as a card's ``usage`` mapping (what a derived dataset's card carries)."""
        usage: dict[str, Any] = {k: list(getattr(self, k)) for k in ("recipes", "users", "accounts", "hosts")
                                 if getattr(self, k) is not None}
        if self.until is not None:
            usage["until"] = self.until.isoformat()
        return usage

    def check(self, recipe: str, user: str, account: str | None, today, host: str | None = None,
              host_note: str = "") -> None:
        """Raise DataError naming the card, the term and the value when this use is outside the terms. ``host``
        None: not known yet (a job being queued), checked when the job starts."""
        from fnmatch import fnmatchcase

        where = f"data card '{self.path}': " + (f"derived_from '{self.via}' usage" if self.via else "usage")
        if self.until is not None and today > self.until:
            raise DataError(f"{where}.until is {self.until.isoformat()}: the owner's terms for this data ended on "
                            f"that day (today is {today.isoformat()}); nothing may be trained or scored on it now. "
                            f"Ask the data owner to renew them")
        if self.recipes is not None and recipe not in self.recipes:
            raise DataError(f"{where}.recipes allows {self.recipes}, not recipe '{recipe}': the owner allows this "
                            f"data for those purposes only")
        if self.users is not None and user not in self.users:
            raise DataError(f"{where}.users allows {self.users}, not user '{user}'")
        if self.accounts is not None and account not in self.accounts:
            got = (f"account '{account}'" if account else
                   "no Slurm account named (not in a Slurm job slurmctld confirms, or a job queued without one)")
            raise DataError(f"{where}.accounts allows the jobs of Slurm accounts {self.accounts}, and this has "
                            f"{got}: run it as a job of one of them (aift launch with a cluster.allocation whose "
                            f"account is listed)")
        if self.hosts is not None and host is not None and not any(fnmatchcase(host, p) for p in self.hosts):
            raise DataError(f"{where}.hosts allows the data to be used on {self.hosts} only, not on '{host}'"
                            f"{host_note}: run it where the owner allows")


def parse_usage(usage: Any, path: Path, via: str | None = None) -> UsageTerms:
    """A card's ``usage`` mapping, checked: an unknown key or a value of the wrong kind is an error, never a term
    silently dropped (a mistyped ``untill`` must not lift a restriction)."""
    where = f"data card '{path}': " + (f"derived_from '{via}' usage" if via else "usage")
    if not isinstance(usage, dict):
        raise DataError(f"{where} must be a mapping of {', '.join(USAGE_KEYS)}, not {usage!r}")
    unknown = sorted(set(usage) - set(USAGE_KEYS), key=str)
    if unknown:
        raise DataError(f"{where} has unknown key(s) {unknown}; valid: {', '.join(USAGE_KEYS)}")
    terms = UsageTerms(path, via=via)
    for key in ("recipes", "users", "accounts", "hosts"):
        value = usage.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise DataError(f"{where}.{key} must be a non-empty list of names, not {value!r}")
        setattr(terms, key, value)
    until = usage.get("until")
    if until is not None:
        if isinstance(until, datetime.datetime):
            until = until.date()
        elif isinstance(until, str):
            try:
                until = datetime.date.fromisoformat(until)
            except ValueError:
                until = None
        if not isinstance(until, datetime.date):
            raise DataError(f"{where}.until must be a date (YYYY-MM-DD), not {usage['until']!r}")
        terms.until = until
    return terms


def card_terms(path: Path, card: dict[str, Any] | None = None) -> list[UsageTerms]:
    """Every set of terms the card at ``path`` states: its own ``usage`` and, for a derived dataset, the ``usage``
    of each source card it carries under ``derived_from`` (and theirs, for data derived twice): those keep applying
    to what was made of the data."""
    card = load_datacard(path) if card is None else card
    return _terms_in(card, path, None, depth=0)


def _terms_in(card: dict[str, Any], path: Path, via: str | None, depth: int) -> list[UsageTerms]:
    terms = [] if card.get("usage") is None else [parse_usage(card["usage"], path, via)]
    derived = card.get("derived_from")
    if derived is None:
        return terms
    sources = derived.get("cards") if isinstance(derived, dict) else None
    if depth > 20 or not isinstance(sources, list) or not all(
            isinstance(s, dict) and isinstance(s.get("path"), str) and isinstance(s.get("card"), dict)
            for s in sources):
        raise DataError(f"data card '{path}': derived_from must be a mapping whose 'cards' lists the source cards "
                        f"(path, card) as `aift data deidentify` writes them, not {derived!r}")
    for source in sources:
        terms += _terms_in(source["card"], path, source["path"], depth + 1)
    return terms


def read_usage_terms(root: str | Path) -> UsageTerms | None:
    """The ``usage`` section of the card in the folder ``root`` (that card only), or None."""
    path = Path(root) / DATACARD_FILE
    if not path.is_file():
        return None
    card = load_datacard(path)
    return None if card.get("usage") is None else parse_usage(card["usage"], path)


# -- who, where, under which account ---------------------------------------------------------------------------
def os_user() -> str:
    """The login name of this process's uid (not ``$USER`` or ``$LOGNAME``, which anyone can set)."""
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # a uid without a passwd entry (some containers): no name a term could list
        return f"uid {os.getuid()}"


def kernel_host() -> str:
    """The kernel's host name (not ``$HOSTNAME`` or ``$SLURMD_NODENAME``)."""
    return socket.gethostname()


def in_own_user_namespace() -> bool:
    """True in a user namespace other than the machine's: there an ordinary user may set the host name (``unshare
    -Uu``), so the kernel's host name says nothing about where the process runs."""
    try:
        maps = Path("/proc/self/uid_map").read_text().split()
    except OSError:
        return False
    return maps != ["0", "0", "4294967295"]


SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


def _root_owned_and_safe(path: Path) -> bool:
    """``path`` and every folder above it belong to root and no one else may change them (a sticky folder such as
    /tmp counts as safe: others cannot replace what root keeps in it). A Slurm client or config an ordinary user
    could have written is not asked."""
    try:
        for part in (path, *path.parents):
            st = part.stat()
            if st.st_uid != 0:
                return False
            if st.st_mode & 0o022 and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
                return False
    except OSError:
        return False
    return True


def _slurm_client(name: str) -> tuple[str, dict[str, str]] | None:
    """The Slurm command ``name`` and the environment to run it in, when both can be trusted: the command
    root's, the config (``$SLURM_CONF``, or Slurm's default) root's; no other variable reaches it."""
    import shutil

    # the system's own folders only, not the user's $PATH: a link of theirs could choose which root-owned program
    # answers as squeue
    found = shutil.which(name, path=SYSTEM_PATH)
    if found is None or not _root_owned_and_safe(Path(found)) or not _root_owned_and_safe(Path(found).resolve()):
        return None
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}
    conf = os.environ.get("SLURM_CONF")
    if conf:
        if not _root_owned_and_safe(Path(conf).resolve()):
            log.warning("$SLURM_CONF '%s' is not a root-owned file others cannot change; the Slurm job is not "
                        "taken into account for the data owner's terms", conf)
            return None
        env["SLURM_CONF"] = conf
    return found, env


def _slurm(name: str, *args: str, env: dict[str, str] | None = None) -> str | None:
    client = _slurm_client(name)
    if client is None:
        return None
    try:
        result = subprocess.run([client[0], *args], capture_output=True, text=True, env={**client[1], **(env or {})},
                                timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


def _is_this_machine(names: Iterable[str]) -> bool:
    """One of ``names`` (a node's NodeHostName, NodeAddr) is this machine: the kernel's host name (outside a user
    namespace of one's own), or an address this machine can bind to (loopback included: the emulated nodes of a
    one-machine cluster)."""
    names = [n for n in names if n and n not in ("(null)", "N/A")]
    host = kernel_host()
    if not in_own_user_namespace() and any(n == host or n.split(".")[0] == host.split(".")[0] for n in names):
        return True
    for name in names:
        try:
            infos = socket.getaddrinfo(name, None, type=socket.SOCK_DGRAM)
        except OSError:
            continue
        for family, _, _, _, address in infos:
            try:
                with socket.socket(family, socket.SOCK_DGRAM) as probe:
                    probe.bind((address[0], 0))  # only an address of this machine can be bound
                return True
            except OSError:
                continue
    return False


@dataclass(frozen=True)
class SlurmJob:
    """A Slurm job this process runs in, as slurmd and slurmctld say (not as the environment says)."""

    job_id: str
    node: str
    account: str | None


def verified_slurm_job() -> SlurmJob | None:
    """The job this process belongs to, or None. slurmd is asked which job this pid belongs to (`scontrol pidinfo`,
    so ``$SLURM_JOB_ID`` counts for nothing); slurmctld then must say it is RUNNING and this uid's; its node is
    one of the job's nodes whose address is this machine's."""
    # Where several slurmd run on one host (emulated nodes), $SLURMD_NODENAME picks the one scontrol asks. It cannot
    # make a job up: that slurmd answers for this pid only, and the node must turn out to be this machine (below).
    asked = os.environ.get("SLURMD_NODENAME", "")
    asked = asked if re.fullmatch(r"[A-Za-z0-9_.-]{1,200}", asked) else ""
    out = _slurm("scontrol", "pidinfo", str(os.getpid()), env={"SLURMD_NODENAME": asked} if asked else None)
    match = re.search(r"JobId=(\d+)", out or "")
    if match is None:
        return None
    job_id = match.group(1)
    # squeue's fields here are numbers and names, never free text (a job name could hold " Account=x")
    row = (_slurm("squeue", "--noheader", "--jobs", job_id, "--format", "%i|%U|%T|%a|%N") or "").strip().split("|")
    if len(row) != 5 or row[0] != job_id or row[1] != str(os.getuid()) or row[2] != "RUNNING":
        return None
    nodes = (_slurm("scontrol", "show", "hostnames", row[4]) or "").split()
    here = []
    for node in nodes:
        info = (_slurm("sinfo", "--noheader", "--Node", "--nodes", node, "--format", "%N|%o|%n") or "").split()
        fields = info[0].split("|") if info else []
        if len(fields) == 3 and fields[0] == node and _is_this_machine(fields[1:]):
            here.append(node)
    if not here or (asked and asked not in here):
        return None
    node = asked or here[0]
    account = row[3] if row[3] not in ("", "(null)") else None
    return SlurmJob(job_id, node, account)


# -- the recipe that runs --------------------------------------------------------------------------------------
def running_recipe(recipe_cfg: dict[str, Any]) -> str:
    """The registered recipe whose code runs: the package of ``recipe.module._target_``
    (``aifactory_train.recipes.NAME.module.X``: NAME; a recipe of ``$AIFT_RECIPES_PATH``,
    ``tulip_grading.module.X``: tulip_grading). ``recipe.name`` must say the same: it is what the owner's terms,
    the MLflow experiment and the run folders go by."""
    import importlib.util

    from aifactory_train.locations import recipe_folders, recipe_package

    target = str((recipe_cfg.get("module") or {}).get("_target_") or "")
    named = recipe_cfg.get("name")
    registered = recipe_folders()
    identity, known = "", False
    for name, folder in registered.items():
        package = recipe_package(name)
        if target.startswith(package + "."):
            # the package imported from that name must be the registered recipe's folder, not a module of the same
            # name found elsewhere on sys.path
            spec = importlib.util.find_spec(package)
            location = Path(list(spec.submodule_search_locations)[0]).resolve() if spec and \
                spec.submodule_search_locations else None
            identity, known = name, location == folder.resolve()
            break
    if not known:
        raise ConfigError(f"config key 'recipe.module._target_': '{target}' is not the code of a registered recipe "
                          f"(a shipped recipe's package or a recipe package of $AIFT_RECIPES_PATH); valid "
                          f"recipes: {', '.join(sorted(registered))}")
    identity = identity or target.split(".")[0]
    if named != identity:
        raise ConfigError(f"config key 'recipe.name': '{named}' is not the recipe that runs: recipe.module._target_ "
                          f"'{target}' is recipe {identity}'s code; valid: recipe.name={identity} (to run {named}, "
                          f"give recipe={named})")
    return identity


# -- the check -------------------------------------------------------------------------------------------------
def describe_cards(cards: list[Path]) -> dict[str, Any]:
    """What the cards state, for the run's record: each card's consent and terms (its own and its sources')."""
    listed = []
    for path in cards:
        card = load_datacard(path)
        listed.append({"path": str(path), "owner": card.get("owner"), "consent": card.get("consent"),
                       "terms": [t.describe() + (f" (from {t.via})" if t.via else "") for t in card_terms(path, card)]})
    return {"cards": listed, "consent_stated": any(c["consent"] not in (None, "") for c in listed),
            "terms_stated": any(c["terms"] for c in listed)}


def check_usage(paths: str | Path | Iterable[str | Path], recipe_cfg: dict[str, Any], account: str | None = None,
                queued: bool = False, today: datetime.date | None = None, config: Any = None) -> dict[str, Any]:
    """Refuse a use of the data at ``paths`` that the terms of any card covering it do not allow; return what was
    checked, for the run's record. ``recipe_cfg``: the composed ``recipe`` section (the recipe is the one whose
    code runs); ``account``: only for ``queued``, the Slurm account `aift launch` queues the job under (the job
    checks again where it starts, with the account slurmctld gives it); ``queued``: the node is not known yet;
    ``config``: the whole config, for the purpose it declares (``run.purpose``, checked against the cards' DUO
    codes, aifactory_train/records/consent.py) and where its audit log goes (``audit.path``, aifactory_train/records/audit.py).
    The outcome, allowed or refused, is noted for the command's audit line."""
    from aifactory_train.records import audit

    try:
        record = _check_usage(paths, recipe_cfg, account, queued, today, config)
    except (DataError, ConfigError) as err:
        audit.note_check(config, refusal=err, paths=paths)
        raise
    audit.note_check(config, record=record)
    return record


def _check_usage(paths, recipe_cfg, account, queued, today, config) -> dict[str, Any]:
    from aifactory_train.records.consent import check_purpose_codes

    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    recipe = running_recipe(recipe_cfg)
    cards = datacards_for(paths)
    terms = [t for path in cards for t in card_terms(path)]
    user = os_user()
    job = None if queued else verified_slurm_job()
    if not queued:
        account = job.account if job is not None else None
    host, host_from, host_note = None, "not known yet (a queued job)", ""
    if not queued:
        if job is not None:
            host, host_from = job.node, f"slurm job {job.job_id} (node confirmed by slurmctld to be this machine)"
        else:
            host, host_from = kernel_host(), "the kernel's host name"
            if in_own_user_namespace():
                host_note = " (in a user namespace, where the host name can be set, it counts for nothing)"
                host, host_from = "(unverifiable)", "none: a user namespace's host name can be set by its user"
    today = today or datetime.date.today()
    for term in terms:
        term.check(recipe, user, account, today, host=host, host_note=host_note)
    consent = check_purpose_codes(cards, config, user, today)  # the cards' DUO codes against run.purpose
    from aifactory_train.records.withdrawal import lists_for, reload

    reload()  # every withdrawal list is read now, as it is: one that cannot be read refuses the run before any data is
    consent["withdrawals"] = list({w.path: w.as_dict() for c in cards for w in lists_for(c.parent)}.values())
    record = {"recipe": recipe, "user": user, "host": host, "host_from": host_from, "account": account,
              "slurm_job": job.job_id if job is not None else None,
              "paths": [str(Path(p).resolve()) for p in paths][:20], **describe_cards(cards), **consent}
    if not record["consent_stated"] and not record["terms_stated"]:
        where = (f"data card(s) {', '.join(repr(str(c)) for c in cards)} state no consent and no usage terms"
                 if cards else f"no {DATACARD_FILE} at or above "
                 f"{', '.join(repr(str(Path(p).resolve())) for p in paths[:3])}: no consent or usage terms are stated")
        if where not in _WARNED:  # once per process: the CLI's preflight and the run both check
            _WARNED.add(where)
            log.warning("%s; what the data's owner allows is unknown, and the run records that none were stated",
                        where)
    return record


_WARNED: set[str] = set()


def terms_summary(record: dict[str, Any]) -> str:
    """One line for the run's data card record: the terms that applied, or that none were stated."""
    if record["terms_stated"]:
        return "; ".join(t for c in record["cards"] for t in c["terms"])
    if record["consent_stated"]:
        return "no usage terms stated (consent stated)"
    return "none stated: no card states consent or usage terms" if record["cards"] else "none stated: no data card"


def usage_tags(record: dict[str, Any]) -> dict[str, str]:
    """The record as MLflow tags (``aift.usage.*``)."""
    return {"aift.usage.recipe": record["recipe"], "aift.usage.user": record["user"],
            "aift.usage.host": str(record["host"]), "aift.usage.host_from": record["host_from"],
            "aift.usage.account": record["account"] or "", "aift.usage.slurm_job": record["slurm_job"] or "",
            "aift.usage.cards": ", ".join(c["path"] for c in record["cards"]) or "none",
            "aift.usage.terms": terms_summary(record),
            **consent_tags(record)}


def consent_tags(record: dict[str, Any]) -> dict[str, str]:
    """The DUO codes and the declared purpose as tags (MLflow runs, exported models' metadata, registered versions)."""
    from aifactory_train.records.consent import codes_summary, purpose_summary

    return {"aift.usage.duo": codes_summary(record.get("consent_codes") or []),
            "aift.usage.purpose": purpose_summary(record.get("purpose") or {})}
