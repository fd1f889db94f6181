"""Credentials kept out of everything aift writes down.

A tracking URI may carry a password (``postgresql://user:pw@host/db``, ``http://user:pw@host:5000``) or a token in
its query (``?password=...``, ``?token=...``). The process that talks to the store needs it; nothing that outlives
the process may hold it: config and summary files, MLflow params and artifacts, checkpoints and their provenance
record, exported models (which leave the site on a sorting line or a sprayer), log files and messages. Every
place that turns the config or a URI into such a record goes through :func:`redacted` / :func:`redact_uri`; log
records are passed through :func:`redact_text` by :func:`redact_log_records`, so a URI that reaches a log line by
another road is masked too.

Credentials belong in MLflow's own environment variables (``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``
or ``MLFLOW_TRACKING_TOKEN``), which are never part of the config.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

MASK = "***"

# scheme://user:password@  - the password runs to the last '@' of the URI's own text (an unencoded '@' in a
# password is common, and SQLAlchemy accepts it), not past whitespace or quotes (a URI inside a message or JSON)
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s/@:'\"<>?#]*):(?P<secret>[^\s'\"<>]*)@")
# http(s)://TOKEN@host: a user part without a password is, for a web server, often a token
_WEB_USER_TOKEN = re.compile(r"(?P<head>\bhttps?://)(?P<secret>[^\s/@:'\"<>?#]+)@")
# ?password=... &token=... ;api_key=...: query keys that name a secret, wherever in the key
_QUERY_SECRET = re.compile(
    r"(?P<head>[?&;](?:[\w.\-]*(?:passw(?:or)?d|pwd|secret|token|api[_\-]?key|access[_\-]?key|credential|signature)"
    r"[\w.\-]*|key|sig|auth|pass)=)(?P<secret>[^&;#\s'\"<>]*)",
    re.IGNORECASE,
)


def redact_text(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` and every secret-named query value
    replaced by ``***``. Text without either (a URI without credentials, a file path) comes back unchanged."""
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@" if m["secret"] != MASK else m[0], text)
    text = _WEB_USER_TOKEN.sub(lambda m: f"{m['head']}{MASK}@" if m["secret"] != MASK else m[0], text)
    return _QUERY_SECRET.sub(lambda m: f"{m['head']}{MASK}" if m["secret"] else m[0], text)


def redact_uri(uri: str | None) -> str | None:
    """A store URI as it may be written down: user and host kept (which store, as whom), password and query
    secrets masked. ``None`` stays ``None``."""
    return uri if uri is None else redact_text(str(uri))


def has_credentials(uri: str | None) -> bool:
    return uri is not None and redact_uri(uri) != uri


def redacted(tree: Any) -> Any:
    """A copy of a resolved config (or any record: nested dicts, lists, strings) with every string redacted.
    Every string, not only ``tracking.uri``: a data root or tag can be a URI with a password too."""
    if isinstance(tree, dict):
        return {key: redacted(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(redacted(value) for value in tree)
    if isinstance(tree, str):
        return redact_text(tree)
    return tree


def connectable(recorded: str | None, live: str | None) -> str | None:
    """The URI to connect to a store a record names (a checkpoint's training run): the live config's URI when the
    record is its redacted form (same store; the live one has the password), else the record with the masked parts
    taken out, so MLflow's environment variables supply the credentials (a masked ``***`` sent as a password would
    override them)."""
    if recorded is None or MASK not in recorded:
        return recorded
    if live is not None and redact_uri(live) == recorded:
        return live
    if recorded.startswith(("http://", "https://")):
        # no user either: requests sends a URL's user (with an empty password) in place of MLflow's credentials
        no_password = re.sub(r"^(https?://)[^/@]*@", r"\1", recorded)
    else:  # a database URI keeps its user (the password may come from e.g. ~/.pgpass)
        no_password = recorded.replace(f":{MASK}@", "@", 1)
    no_secret = _QUERY_SECRET.sub(lambda m: "" if m["secret"] == MASK else m[0], no_password)
    if "?" not in no_secret and "&" in no_secret:  # the first query item went: its successor opens the query
        no_secret = no_secret.replace("&", "?", 1)
    return no_secret


def redact_log_records() -> None:
    """Every log record made in this process (aift's, Hydra's, MLflow's, Lightning's) has its message redacted
    before any handler sees it: Hydra replaces the handlers (console, the run's log file), so the record factory is
    the one hook that covers them all. Idempotent."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "_aift_redacting", False):
        return

    def factory(*args, **kwargs):
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is left to the handler to report, as without us
            return record
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:  # a traceback (log.exception) is text a handler writes too
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return record

    factory._aift_redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def redact_yaml_file(path: Path) -> bool:
    """Rewrite a YAML file (Hydra's ``.hydra/config.yaml``, ``hydra.yaml``, ``overrides.yaml``, ``multirun.yaml``)
    with its strings redacted; interpolations stay as they were. Returns whether it held a secret."""
    from omegaconf import OmegaConf

    if not path.is_file():
        return False
    tree = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    clean = redacted(tree)
    if clean == tree:
        return False
    OmegaConf.save(OmegaConf.create(clean), path)
    return True


def one_line(err: BaseException) -> str:
    """An error's message on one line, with any password (a tracking URI's) masked."""
    text = " ".join(line.strip() for line in str(err).strip().splitlines() if line.strip())
    return redact_text(text) or type(err).__name__
